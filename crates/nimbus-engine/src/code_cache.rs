//! The on-disk code cache: each code bundle unpacked once under `data_dir/code/<sha256>/`,
//! shared by every version and instance with the same code.

use std::path::{Path, PathBuf};

use nimbus_core::CodeBundle;

/// Unpacks code bundles into content-addressed directories.
#[derive(Debug, Clone)]
pub struct CodeCache {
    root: PathBuf,
}

impl CodeCache {
    /// A cache under `root` (created on demand).
    pub fn new(root: PathBuf) -> Self {
        CodeCache { root }
    }

    /// The directory holding `bundle`'s files, unpacking it first if needed. A directory is
    /// only ever complete: it is written under a temporary name and renamed into place.
    pub fn materialize(&self, bundle: &CodeBundle) -> std::io::Result<PathBuf> {
        let hash = bundle.hash();
        let dir = self.root.join(hash.trim_start_matches("sha256:"));
        if dir.is_dir() {
            return Ok(dir);
        }
        std::fs::create_dir_all(&self.root)?;
        let tmp = tempfile::Builder::new()
            .prefix(".unpack-")
            .tempdir_in(&self.root)?;
        for (path, data) in bundle.files() {
            let target = tmp.path().join(path);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&target, data)?;
        }
        let tmp = tmp.keep();
        make_traversable(&tmp)?;
        match std::fs::rename(&tmp, &dir) {
            Ok(()) => Ok(dir),
            // Another request unpacked the same code first: theirs is identical.
            Err(_) if dir.is_dir() => {
                let _ = std::fs::remove_dir_all(&tmp);
                Ok(dir)
            }
            Err(e) => Err(e),
        }
    }
}

fn make_traversable(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nimbus_core::{Handler, Runtime};

    #[test]
    fn bundles_unpack_once_into_their_hash_directory() {
        let root = tempfile::tempdir().unwrap();
        let cache = CodeCache::new(root.path().join("code"));
        let bundle = CodeBundle::from_inline(
            "def handle(e): return e\n",
            &Handler::default(),
            Runtime::Python311,
        )
        .unwrap();
        let dir = cache.materialize(&bundle).unwrap();
        assert!(dir.ends_with(bundle.hash().trim_start_matches("sha256:")));
        assert_eq!(
            std::fs::read_to_string(dir.join("handler.py")).unwrap(),
            "def handle(e): return e\n"
        );
        assert_eq!(cache.materialize(&bundle).unwrap(), dir);
        let entries = std::fs::read_dir(root.path().join("code")).unwrap().count();
        assert_eq!(entries, 1, "no temporary directories left behind");
    }

    #[test]
    fn bundles_at_the_name_and_path_limits_unpack() {
        use nimbus_core::limits::{MAX_CODE_NAME_BYTES, MAX_CODE_PATH_BYTES};
        let longest_name = "n".repeat(MAX_CODE_NAME_BYTES);
        let mut longest_path = vec!["d".repeat(200); 4].join("/");
        longest_path.push('/');
        longest_path.push_str(&"p".repeat(MAX_CODE_PATH_BYTES - longest_path.len()));
        assert_eq!(longest_path.len(), MAX_CODE_PATH_BYTES);
        // The normalized encoding (see nimbus_core::code), as a stored bundle is read.
        let mut encoded = b"NIMBUS1\0".to_vec();
        for path in [&longest_name, &longest_path] {
            encoded.extend_from_slice(path.as_bytes());
            encoded.push(0);
            encoded.extend_from_slice(&2u64.to_be_bytes());
            encoded.extend_from_slice(b"ok");
        }
        let bundle = CodeBundle::decode(&encoded).unwrap();
        // Under a data directory as long as a deep real one.
        let root = tempfile::tempdir().unwrap();
        let data_dir = root.path().join("x".repeat(200)).join("y".repeat(200));
        let dir = CodeCache::new(data_dir.join("code"))
            .materialize(&bundle)
            .unwrap();
        assert_eq!(std::fs::read(dir.join(&longest_name)).unwrap(), b"ok");
        assert_eq!(std::fs::read(dir.join(&longest_path)).unwrap(), b"ok");
    }
}
