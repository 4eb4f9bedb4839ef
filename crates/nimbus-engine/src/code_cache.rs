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
}
