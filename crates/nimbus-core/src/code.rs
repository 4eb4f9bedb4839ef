//! Code bundles: the files of a function, how they arrive (inline or archive) and how they are hashed.
//!
//! The normalized encoding is the bundle's identity: files sorted by path, each written as
//! `path NUL length(u64 BE) bytes`. `code_hash` is `sha256:` of it and stores keep it as is.
//!
//! Every file is checked as it is added, so that a bundle is always one the server can
//! unpack: a safe relative path of at most [`MAX_CODE_PATH_BYTES`] bytes whose names are at
//! most [`MAX_CODE_NAME_BYTES`] bytes each, no path twice, and no path that is a file and
//! also a directory of another file. Paths are compared exactly: names that differ only in
//! case are different files, as on the Linux file systems the code is unpacked on.

use std::collections::BTreeMap;
use std::io::{Cursor, Read};

use sha2::{Digest, Sha256};

use crate::echo::echo;
use crate::error::ValidationError;
use crate::limits::{MAX_CODE_BYTES, MAX_CODE_FILES, MAX_CODE_NAME_BYTES, MAX_CODE_PATH_BYTES};
use crate::runtime::{Handler, Runtime};

const MAGIC: &[u8; 8] = b"NIMBUS1\0";

/// One entry of an archive, as a bundle takes it.
enum Entry<R> {
    /// A directory (or metadata of the archive format): nothing to add.
    Directory,
    /// A regular file, and a reader of its content.
    File(R),
    /// Any other kind of entry, refused for the reason given.
    Refused(&'static str),
}

/// The source files of a function, by relative path.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CodeBundle {
    files: BTreeMap<String, Vec<u8>>,
}

impl CodeBundle {
    /// A bundle of one file holding `source`, named after the handler's module (`handler.handle` → `handler.py`).
    pub fn from_inline(
        source: &str,
        handler: &Handler,
        runtime: Runtime,
    ) -> Result<Self, ValidationError> {
        let mut bundle = CodeBundle::default();
        bundle.insert(
            &handler.module_file(runtime),
            source.as_bytes().to_vec(),
            "code",
        )?;
        Ok(bundle)
    }

    /// A bundle from a zip, tar or tar.gz archive (detected by its magic bytes).
    pub fn from_archive(bytes: &[u8]) -> Result<Self, ValidationError> {
        let bad = |why: String| ValidationError::new("code_archive", why);
        if bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06") {
            Self::from_zip(bytes).map_err(bad)
        } else if bytes.starts_with(&[0x1f, 0x8b]) {
            let decoder = flate2::read::GzDecoder::new(bytes);
            Self::from_tar(decoder.take(MAX_CODE_BYTES as u64 * 2)).map_err(bad)
        } else if bytes.len() >= 262 && &bytes[257..262] == b"ustar" {
            Self::from_tar(bytes).map_err(bad)
        } else {
            Err(bad("not a zip, tar or tar.gz archive".into()))
        }
    }

    fn from_zip(bytes: &[u8]) -> Result<Self, String> {
        let mut archive =
            zip::ZipArchive::new(Cursor::new(bytes)).map_err(|e| format!("invalid zip: {e}"))?;
        // The reader keeps one entry per name: a second entry of a name would be dropped
        // without a word, so the central directory is counted too.
        let names = zip_entry_names(bytes, archive.central_directory_start());
        if names.len() > archive.len() {
            let mut seen = std::collections::HashSet::new();
            return Err(match names.into_iter().find(|n| !seen.insert(*n)) {
                Some(name) => format!(
                    "{}: the archive holds this path twice",
                    echo(&String::from_utf8_lossy(name))
                ),
                None => "two entries of the archive have one name".into(),
            });
        }
        let mut bundle = CodeBundle::default();
        for i in 0..archive.len() {
            let mut entry = archive
                .by_index(i)
                .map_err(|e| format!("invalid zip entry: {e}"))?;
            let name = entry.name().to_string();
            let kind = if entry.is_dir() {
                Entry::Directory
            } else if entry.is_symlink() {
                Entry::Refused("symbolic links are not allowed")
            } else {
                Entry::File(&mut entry)
            };
            bundle.add_entry(&name, kind)?;
        }
        bundle.finish_archive()
    }

    fn from_tar(reader: impl Read) -> Result<Self, String> {
        let mut archive = tar::Archive::new(reader);
        let mut bundle = CodeBundle::default();
        for entry in archive.entries().map_err(|e| format!("invalid tar: {e}"))? {
            let mut entry = entry.map_err(|e| format!("invalid tar entry: {e}"))?;
            let kind = entry.header().entry_type();
            let name = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let kind = if kind.is_dir()
                || kind.is_pax_global_extensions()
                || kind.is_pax_local_extensions()
            {
                Entry::Directory
            } else if kind.is_file() {
                Entry::File(&mut entry)
            } else {
                Entry::Refused("only regular files and directories are allowed")
            };
            bundle.add_entry(&name, kind)?;
        }
        bundle.finish_archive()
    }

    /// Adds one entry of an archive: the per-entry checks of every archive format.
    fn add_entry(&mut self, name: &str, entry: Entry<impl Read>) -> Result<(), String> {
        let content = match entry {
            Entry::Directory => return Ok(()),
            Entry::Refused(why) => return Err(format!("{}: {why}", echo(name))),
            Entry::File(content) => content,
        };
        let mut data = Vec::new();
        // One byte past the limit is enough for `insert` to refuse the file.
        content
            .take(MAX_CODE_BYTES as u64 + 1)
            .read_to_end(&mut data)
            .map_err(|e| format!("{}: {e}", echo(name)))?;
        self.insert(name, data, "code_archive")
            .map_err(|e| e.message)
    }

    /// The bundle of a whole archive: refused if it holds no files.
    fn finish_archive(self) -> Result<Self, String> {
        if self.files.is_empty() {
            return Err("the archive contains no files".into());
        }
        Ok(self)
    }

    fn insert(
        &mut self,
        raw_path: &str,
        data: Vec<u8>,
        field: &str,
    ) -> Result<(), ValidationError> {
        let path = normalize_path(raw_path).ok_or_else(|| {
            ValidationError::new(
                field,
                format!("{} is not a safe relative path", echo(raw_path)),
            )
        })?;
        self.check_writable(&path)
            .map_err(|why| ValidationError::new(field, format!("{}: {why}", echo(&path))))?;
        if self.files.len() >= MAX_CODE_FILES {
            return Err(ValidationError::new(
                field,
                format!("more than {MAX_CODE_FILES} files"),
            ));
        }
        let total: usize = self.total_bytes() + data.len();
        if total > MAX_CODE_BYTES {
            return Err(ValidationError::new(
                field,
                format!("code is larger than {} MiB unpacked", MAX_CODE_BYTES >> 20),
            ));
        }
        self.files.insert(path, data);
        Ok(())
    }

    /// Why `path` (normalized) could not be written next to the files already in the
    /// bundle: a name or the whole path too long for the file system, the same path twice,
    /// or a path that is a file and a directory at once.
    fn check_writable(&self, path: &str) -> Result<(), String> {
        if let Some(name) = path.split('/').find(|n| n.len() > MAX_CODE_NAME_BYTES) {
            return Err(format!(
                "the name {} is {} bytes; names are at most {MAX_CODE_NAME_BYTES} bytes",
                echo(name),
                name.len()
            ));
        }
        if path.len() > MAX_CODE_PATH_BYTES {
            return Err(format!(
                "the path is {} bytes; paths are at most {MAX_CODE_PATH_BYTES} bytes",
                path.len()
            ));
        }
        if self.files.contains_key(path) {
            return Err("the archive holds this path twice".into());
        }
        let parents = path.match_indices('/').map(|(at, _)| &path[..at]);
        if let Some(parent) = parents.into_iter().find(|p| self.files.contains_key(*p)) {
            return Err(format!(
                "its directory {} is also a file in the archive",
                echo(parent)
            ));
        }
        let below = format!("{path}/");
        if let Some((inside, _)) = self.files.range(below.clone()..).next() {
            if inside.starts_with(&below) {
                return Err(format!(
                    "it is a file, and also the directory of {} in the archive",
                    echo(inside)
                ));
            }
        }
        Ok(())
    }

    /// Checks that the handler's module file is in the bundle.
    pub fn check_handler(
        &self,
        handler: &Handler,
        runtime: Runtime,
    ) -> Result<(), ValidationError> {
        let file = handler.module_file(runtime);
        // A Node.js module may also be an ES module (.mjs) or explicitly CommonJS (.cjs).
        let alternatives: &[&str] = match runtime {
            Runtime::NodeJs20 => &["mjs", "cjs"],
            Runtime::Python311 => &[],
        };
        let stem = file
            .strip_suffix(runtime.source_extension())
            .unwrap_or(&file);
        if self.files.contains_key(&file)
            || alternatives
                .iter()
                .any(|ext| self.files.contains_key(&format!("{stem}{ext}")))
        {
            return Ok(());
        }
        let mut listed: Vec<String> = self
            .files
            .keys()
            .take(10)
            .map(|f| echo(f).to_string())
            .collect();
        if self.files.len() > 10 {
            listed.push("…".into());
        }
        Err(ValidationError::new(
            "handler",
            format!(
                "handler {} needs {}, which the code does not contain (files: {})",
                echo(&handler.to_string()),
                echo(&file),
                listed.join(", ")
            ),
        ))
    }

    /// The files, by normalized relative path.
    pub fn files(&self) -> &BTreeMap<String, Vec<u8>> {
        &self.files
    }

    /// Sum of the file sizes.
    pub fn total_bytes(&self) -> usize {
        self.files.values().map(Vec::len).sum()
    }

    /// The normalized encoding (see the module doc).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAGIC.len() + self.total_bytes() + self.files.len() * 32);
        out.extend_from_slice(MAGIC);
        for (path, data) in &self.files {
            out.extend_from_slice(path.as_bytes());
            out.push(0);
            out.extend_from_slice(&(data.len() as u64).to_be_bytes());
            out.extend_from_slice(data);
        }
        out
    }

    /// Reads a bundle written by [`CodeBundle::encode`].
    pub fn decode(bytes: &[u8]) -> Result<Self, ValidationError> {
        let corrupt = || ValidationError::new("code", "stored code bundle is corrupt");
        let mut rest = bytes.strip_prefix(MAGIC.as_slice()).ok_or_else(corrupt)?;
        let mut files = BTreeMap::new();
        while !rest.is_empty() {
            let nul = rest.iter().position(|&b| b == 0).ok_or_else(corrupt)?;
            let path = std::str::from_utf8(&rest[..nul])
                .map_err(|_| corrupt())?
                .to_string();
            rest = &rest[nul + 1..];
            let len_bytes: [u8; 8] = rest
                .get(..8)
                .ok_or_else(corrupt)?
                .try_into()
                .map_err(|_| corrupt())?;
            let len = u64::from_be_bytes(len_bytes) as usize;
            let data = rest.get(8..8 + len).ok_or_else(corrupt)?.to_vec();
            rest = &rest[8 + len..];
            files.insert(path, data);
        }
        Ok(CodeBundle { files })
    }

    /// `sha256:<hex>` of the normalized encoding.
    pub fn hash(&self) -> String {
        let digest = Sha256::digest(self.encode());
        let mut out = String::with_capacity(7 + 64);
        out.push_str("sha256:");
        for byte in digest {
            out.push_str(&format!("{byte:02x}"));
        }
        out
    }
}

/// The raw names of a zip's entries as its central directory (at byte `start`) lists
/// them, every entry of a name included.
fn zip_entry_names(bytes: &[u8], start: u64) -> Vec<&[u8]> {
    const HEADER: usize = 46;
    let mut names = Vec::new();
    let mut at = usize::try_from(start).unwrap_or(usize::MAX);
    while let Some(header) = bytes.get(at..at.saturating_add(HEADER)) {
        if !header.starts_with(b"PK\x01\x02") {
            break;
        }
        let field = |i: usize| usize::from(u16::from_le_bytes([header[i], header[i + 1]]));
        let (name_len, extra_len, comment_len) = (field(28), field(30), field(32));
        let Some(name) = bytes.get(at + HEADER..at + HEADER + name_len) else {
            break;
        };
        names.push(name);
        at += HEADER + name_len + extra_len + comment_len;
    }
    names
}

/// `./a//b.py` → `a/b.py`; `None` for absolute paths, `..`, empty names or NUL bytes.
fn normalize_path(raw: &str) -> Option<String> {
    if raw.starts_with('/') || raw.contains('\0') || raw.contains('\\') {
        return None;
    }
    let parts: Vec<&str> = raw
        .split('/')
        .filter(|p| !p.is_empty() && *p != ".")
        .collect();
    if parts.is_empty() || parts.contains(&"..") {
        return None;
    }
    Some(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn handler() -> Handler {
        Handler::default()
    }

    #[test]
    fn inline_code_is_stored_as_the_handler_module() {
        let b = CodeBundle::from_inline("def handle(e): return e", &handler(), Runtime::Python311)
            .unwrap();
        assert_eq!(b.files().keys().collect::<Vec<_>>(), vec!["handler.py"]);
        b.check_handler(&handler(), Runtime::Python311).unwrap();
        let other: Handler = "main.run".parse().unwrap();
        let err = b.check_handler(&other, Runtime::Python311).unwrap_err();
        assert!(err.message.contains("main.py"), "{}", err.message);
    }

    #[test]
    fn a_node_module_may_be_js_mjs_or_cjs() {
        let handler: Handler = "app.main.handle".parse().unwrap();
        for file in ["app/main.js", "app/main.mjs", "app/main.cjs"] {
            let b = CodeBundle::from_archive(&zip_of(&[(file, "")])).unwrap();
            b.check_handler(&handler, Runtime::NodeJs20).unwrap();
            assert!(b.check_handler(&handler, Runtime::Python311).is_err());
        }
        let b = CodeBundle::from_archive(&zip_of(&[("app/main.ts", "")])).unwrap();
        let err = b.check_handler(&handler, Runtime::NodeJs20).unwrap_err();
        assert!(err.message.contains("app/main.js"), "{}", err.message);
    }

    #[test]
    fn encoding_round_trips_and_hash_is_stable() {
        let a = CodeBundle::from_inline("x = 1\n", &handler(), Runtime::Python311).unwrap();
        let b = CodeBundle::decode(&a.encode()).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.hash(), b.hash());
        assert!(a.hash().starts_with("sha256:") && a.hash().len() == 71);
        let c = CodeBundle::from_inline("x = 2\n", &handler(), Runtime::Python311).unwrap();
        assert_ne!(a.hash(), c.hash());
        assert!(CodeBundle::decode(b"garbage").is_err());
        let mut truncated = a.encode();
        truncated.pop();
        assert!(CodeBundle::decode(&truncated).is_err());
    }

    /// A zip of `(path, body)` entries, the same path twice included (the writer refuses
    /// that: the second is written under a stand-in of the same length, renamed in the bytes).
    fn zip_of(files: &[(&str, &str)]) -> Vec<u8> {
        let mut buf = Cursor::new(Vec::new());
        let mut w = zip::ZipWriter::new(&mut buf);
        let mut renames = Vec::new();
        for (i, (name, body)) in files.iter().enumerate() {
            let name = if files[..i].iter().any(|(n, _)| n == name) {
                let stand_in = format!("{i:~>width$}", width = name.len());
                renames.push((stand_in.clone(), name.to_string()));
                stand_in
            } else {
                name.to_string()
            };
            w.start_file(name, zip::write::SimpleFileOptions::default())
                .unwrap();
            w.write_all(body.as_bytes()).unwrap();
        }
        w.finish().unwrap();
        let mut bytes = buf.into_inner();
        for (stand_in, name) in renames {
            let (from, to) = (stand_in.as_bytes(), name.as_bytes());
            let mut at = 0;
            while let Some(i) = bytes[at..].windows(from.len()).position(|w| w == from) {
                bytes[at + i..at + i + from.len()].copy_from_slice(to);
                at += i + from.len();
            }
        }
        bytes
    }

    fn tar_of(files: &[(&str, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, body) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(body.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append_data(&mut h, name, body.as_bytes()).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn archives_of_every_format_give_the_same_bundle() {
        let files = [
            ("handler.py", "import lib\n"),
            ("lib/__init__.py", "X = 1\n"),
        ];
        let from_zip = CodeBundle::from_archive(&zip_of(&files)).unwrap();
        let tar = tar_of(&files);
        let from_tar = CodeBundle::from_archive(&tar).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let from_tgz = CodeBundle::from_archive(&gz.finish().unwrap()).unwrap();
        assert_eq!(from_zip, from_tar);
        assert_eq!(from_tar, from_tgz);
        assert_eq!(from_zip.hash(), from_tgz.hash());
        assert_eq!(from_zip.files().len(), 2);
    }

    #[test]
    fn unsafe_or_bad_archives_are_rejected() {
        let e = CodeBundle::from_archive(&zip_of(&[("../evil.py", "x")])).unwrap_err();
        assert!(e.message.contains("safe relative path"), "{}", e.message);
        assert!(CodeBundle::from_archive(&zip_of(&[("/abs.py", "x")])).is_err());
        assert!(CodeBundle::from_archive(b"hello world")
            .unwrap_err()
            .message
            .contains("not a zip"));
        assert!(CodeBundle::from_archive(&zip_of(&[]))
            .unwrap_err()
            .message
            .contains("no files"));
    }

    /// A tar of `(path, body)` entries written as given, names of any length included (the
    /// builder's `append_data` refuses some, which is the point here).
    fn raw_tar_of(files: &[(&str, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, body) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(body.len() as u64);
            h.set_mode(0o644);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, name, body.as_bytes()).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn archives_the_server_could_not_unpack_are_refused_naming_the_entry() {
        let long_name = format!("{}.py", "n".repeat(300));
        let long_path = format!("{}/x.py", vec!["d".repeat(200); 6].join("/"));
        let cases: &[(&[(&str, &str)], &str)] = &[
            (
                &[("a", "file"), ("a/b.py", "")],
                "its directory \"a\" is also a file",
            ),
            (
                &[("a/b.py", ""), ("a", "file")],
                "also the directory of \"a/b.py\"",
            ),
            (
                &[("p/q", ""), ("p/q/r/s.py", "")],
                "its directory \"p/q\" is also a file",
            ),
            (&[("x.py", "1"), ("x.py", "2")], "this path twice"),
            (&[("x.py", "1"), ("./x.py", "2")], "this path twice"),
            (&[("a//b.py", "1"), ("a/b.py", "2")], "this path twice"),
            (&[(long_name.as_str(), "")], "names are at most 255 bytes"),
            (&[(long_path.as_str(), "")], "paths are at most 1024 bytes"),
        ];
        for (files, needle) in cases {
            for (format, archive) in [("zip", zip_of(files)), ("tar", raw_tar_of(files))] {
                let e = CodeBundle::from_archive(&archive).unwrap_err();
                assert_eq!(e.field, "code_archive");
                assert!(
                    e.message.contains(needle),
                    "{format} {files:?}: {}",
                    e.message
                );
                assert!(e.message.len() < 400, "{format}: {} bytes", e.message.len());
            }
        }
        // Within the limits, and names that differ only in case, are fine.
        let name = format!("{}.py", "n".repeat(252));
        let path = format!("{}/x.py", vec!["d".repeat(200); 4].join("/"));
        let fine = [
            (name.as_str(), ""),
            (path.as_str(), ""),
            ("A.py", "1"),
            ("a.py", "2"),
        ];
        for archive in [zip_of(&fine), raw_tar_of(&fine)] {
            assert_eq!(CodeBundle::from_archive(&archive).unwrap().files().len(), 4);
        }
    }

    #[test]
    fn paths_are_normalized() {
        assert_eq!(normalize_path("./a//b.py").as_deref(), Some("a/b.py"));
        assert_eq!(normalize_path("a/../b"), None);
        assert_eq!(normalize_path(""), None);
    }
}
