//! A snapshot's files on disk: sealed after a checkpoint (every file's size and SHA-256,
//! and `metadata.json` describing the snapshot and its files), verified before a restore.
//! The index row carries the same list, `metadata.json` included, and is what a restore
//! checks against: a file changed, missing or added to the list fails the restore.

use std::io::Read;
use std::path::Path;

use nimbus_core::{Snapshot, SnapshotFile};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// The description written next to the driver's files.
pub(crate) const METADATA: &str = "metadata.json";

#[derive(Serialize)]
struct Metadata<'a> {
    id: &'a str,
    function_id: &'a str,
    version: u32,
    code_hash: &'a str,
    env_vars_hash: &'a str,
    runtime: &'a str,
    memory_mb: u32,
    driver: &'a str,
    files: &'a [SnapshotFile],
}

/// Checksums the driver's files `names` in `dir`, writes [`METADATA`] and returns every
/// file, [`METADATA`] last.
pub(crate) fn seal(
    dir: &Path,
    snapshot: &Snapshot,
    names: &[String],
) -> Result<Vec<SnapshotFile>, String> {
    let mut files = names
        .iter()
        .filter(|n| n.as_str() != METADATA)
        .map(|name| describe(dir, name))
        .collect::<Result<Vec<_>, _>>()?;
    let metadata = Metadata {
        id: &snapshot.id,
        function_id: &snapshot.function_id,
        version: snapshot.version,
        code_hash: &snapshot.code_hash,
        env_vars_hash: &snapshot.env_vars_hash,
        runtime: snapshot.runtime.as_str(),
        memory_mb: snapshot.memory_mb,
        driver: &snapshot.driver,
        files: &files,
    };
    let json = serde_json::to_vec_pretty(&metadata).map_err(|e| e.to_string())?;
    std::fs::write(dir.join(METADATA), json).map_err(|e| format!("writing {METADATA}: {e}"))?;
    files.push(describe(dir, METADATA)?);
    Ok(files)
}

/// Checks every file of `files` in `dir`: present, of its size, of its checksum.
pub(crate) fn verify(dir: &Path, files: &[SnapshotFile]) -> Result<(), String> {
    if files.is_empty() {
        return Err("the snapshot lists no files".into());
    }
    for file in files {
        let found = describe(dir, &file.name)?;
        if found.size != file.size {
            return Err(format!(
                "{} is {} bytes, {} expected",
                file.name, found.size, file.size
            ));
        }
        if found.sha256 != file.sha256 {
            return Err(format!("{} does not match its checksum", file.name));
        }
    }
    Ok(())
}

/// Size and SHA-256 of `dir/name`.
fn describe(dir: &Path, name: &str) -> Result<SnapshotFile, String> {
    let path = dir.join(name);
    let mut file = std::fs::File::open(&path).map_err(|e| format!("{name}: {e}"))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).map_err(|e| format!("{name}: {e}"))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok(SnapshotFile {
        name: name.to_owned(),
        size,
        sha256: format!("{:x}", hasher.finalize()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        serde_json::from_value(serde_json::json!({
            "id": "snap_1", "function_id": "fn_1", "version": 1, "code_hash": "sha256:x",
            "runtime": "python3.11", "memory_mb": 128, "env_vars_hash": "e", "driver": "process",
            "path": null, "files": [], "size_bytes": 0, "status": "ready", "error_message": null,
            "restore_count": 0, "avg_restore_ms": 0.0, "created_at": "2026-11-28T00:00:00Z",
            "last_used_at": null, "expires_at": null
        }))
        .unwrap()
    }

    #[test]
    fn sealed_files_verify_and_any_change_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pages.img"), vec![7u8; 3 << 20]).unwrap();
        std::fs::write(dir.path().join("core.img"), b"core").unwrap();
        let names = vec!["core.img".to_owned(), "pages.img".to_owned()];
        let files = seal(dir.path(), &snapshot(), &names).unwrap();
        assert_eq!(files.len(), 3);
        assert_eq!(files[2].name, METADATA);
        verify(dir.path(), &files).unwrap();

        // One flipped byte.
        let mut pages = std::fs::read(dir.path().join("pages.img")).unwrap();
        pages[1 << 20] ^= 0xff;
        std::fs::write(dir.path().join("pages.img"), &pages).unwrap();
        let err = verify(dir.path(), &files).unwrap_err();
        assert_eq!(err, "pages.img does not match its checksum");
        pages[1 << 20] ^= 0xff;
        std::fs::write(dir.path().join("pages.img"), &pages).unwrap();
        verify(dir.path(), &files).unwrap();

        std::fs::write(dir.path().join("core.img"), b"core!").unwrap();
        assert_eq!(
            verify(dir.path(), &files).unwrap_err(),
            "core.img is 5 bytes, 4 expected"
        );
        std::fs::remove_file(dir.path().join("core.img")).unwrap();
        assert!(verify(dir.path(), &files)
            .unwrap_err()
            .starts_with("core.img: "));
    }
}
