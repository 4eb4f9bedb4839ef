//! `nimbus deploy <path>`: creates a function, or publishes a new version of an existing one.
//!
//! A file is sent inline as `code` (stored as the handler's module); a directory is packed
//! into a deterministic tar.gz (sorted paths, zero mtimes, no `__pycache__`, `.git` or
//! `*.pyc`) and sent base64-encoded as `code_archive`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use base64::Engine as _;
use clap::Args;
use nimbus_client::{FunctionPatch, NewFunction, StateSettings};

use super::{dash, print_json, CliError, Connection};

/// Flags of `nimbus deploy`.
#[derive(Debug, Args)]
pub struct DeployArgs {
    /// A source file (deployed as the handler's module) or a directory (deployed as an archive).
    pub path: PathBuf,
    /// Function name (`[a-z0-9][a-z0-9-_]{0,63}`); an existing function gets a new version.
    #[arg(long)]
    pub name: String,
    /// Runtime [server default: python3.11].
    #[arg(long)]
    pub runtime: Option<String>,
    /// Handler as `module.function` [server default: handler.handle].
    #[arg(long)]
    pub handler: Option<String>,
    /// Memory limit in MiB [server default: 256].
    #[arg(long, value_name = "MB")]
    pub memory: Option<u32>,
    /// Timeout in seconds [server default: 30].
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<u32>,
    /// Network of the function's instances: `none`, or `outbound` for connections to public
    /// addresses [server default: none].
    #[arg(long, value_name = "none|outbound")]
    pub network: Option<String>,
    /// Environment variable (repeatable). On an update the given set replaces all variables;
    /// without --env they are kept.
    #[arg(long = "env", value_name = "KEY=VALUE", value_parser = parse_env_pair)]
    pub env: Vec<(String, String)>,
    /// Description.
    #[arg(long)]
    pub description: Option<String>,
    /// Most instances running at once [server default: 50].
    #[arg(long, value_name = "N")]
    pub max_instances: Option<u32>,
    /// Stage the change on an existing function without publishing a version.
    #[arg(long)]
    pub no_publish: bool,
    /// State between invocations (the `state` argument, SPEC §7) on (`--state`) or off
    /// (`--no-state`) [server default: off]; on an update, unchanged without either.
    #[command(flatten)]
    pub state: StateFlags,

    /// Server, API key and output format.
    #[command(flatten)]
    pub conn: Connection,
}

/// The `state_config` flags of `nimbus deploy`. Only the flags given are sent: a new
/// function takes the server's defaults for the others, an update keeps their values.
#[derive(Debug, Default, Args)]
pub struct StateFlags {
    /// Let the function keep state between invocations.
    #[arg(long, conflicts_with = "no_state")]
    pub state: bool,
    /// Turn state off (what it stored stays until it expires or is deleted).
    #[arg(long)]
    pub no_state: bool,
    /// TTL of state values written without one, seconds (0: none) [server default: 0].
    #[arg(long, value_name = "SECONDS")]
    pub state_ttl: Option<u32>,
    /// Largest state value, bytes of JSON [server default: 65536].
    #[arg(long, value_name = "BYTES")]
    pub state_max_size: Option<u32>,
    /// Most keys in one session's (or the function's) state [server default: 100].
    #[arg(long, value_name = "N")]
    pub state_max_keys: Option<u32>,
    /// Send invocations with the same session key to the same instance (`on`/`off`)
    /// [server default: off].
    #[arg(long, value_name = "on|off", value_parser = parse_on_off)]
    pub session_affinity: Option<bool>,
    /// Seconds a session lasts after its last invocation [server default: 3600].
    #[arg(long, value_name = "SECONDS")]
    pub session_timeout: Option<u32>,
}

impl StateFlags {
    /// The `state_config` of the request, if any flag was given.
    pub fn config(&self) -> Option<StateSettings> {
        let enabled = match (self.state, self.no_state) {
            (true, _) => Some(true),
            (_, true) => Some(false),
            _ => None,
        };
        let settings = StateSettings {
            enabled,
            default_ttl: self.state_ttl,
            max_state_size: self.state_max_size,
            max_keys: self.state_max_keys,
            session_affinity: self.session_affinity,
            session_timeout: self.session_timeout,
        };
        (!settings.is_empty()).then_some(settings)
    }
}

/// `on`/`off` (also `true`/`false`).
fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        other => Err(format!("expected on or off, got {other:?}")),
    }
}

/// Parses one `--env KEY=VALUE`.
pub fn parse_env_pair(s: &str) -> Result<(String, String), String> {
    let Some((key, value)) = s.split_once('=') else {
        return Err(format!(
            "expected KEY=VALUE (e.g. --env LOG_LEVEL=debug), got {s:?}"
        ));
    };
    let mut chars = key.chars();
    let valid = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(format!(
            "{key:?} is not a valid variable name: use letters, digits and _, not starting with a digit"
        ));
    }
    if key.starts_with("NIMBUS_") {
        return Err(format!(
            "{key:?}: the NIMBUS_ prefix is reserved for the platform"
        ));
    }
    Ok((key.to_owned(), value.to_owned()))
}

/// Runs `nimbus deploy`.
pub async fn run(args: DeployArgs) -> Result<(), CliError> {
    let client = args.conn.client()?;
    let fields = request_fields(&args)?;
    let existing = match client.get_function(&args.name).await {
        Ok(f) => Some(f),
        Err(e) if e.has_status(404) => None,
        Err(e) => return Err(e.into()),
    };
    match existing {
        None => {
            if args.no_publish {
                return Err(CliError::Usage(format!(
                    "function {:?} does not exist yet: --no-publish applies only to updates",
                    args.name
                )));
            }
            let new = NewFunction {
                name: args.name.clone(),
                description: fields.description,
                runtime: fields.runtime,
                handler: fields.handler,
                code: fields.code,
                code_archive: fields.code_archive,
                memory_mb: fields.memory_mb,
                timeout_sec: fields.timeout_sec,
                env_vars: fields.env_vars,
                max_instances: fields.max_instances,
                network: fields.network,
                state_config: fields.state_config,
            };
            let created = client.create_function(&new).await?;
            if args.conn.json() {
                print_json(&created);
            } else {
                println!(
                    "created function {} ({}), version {}",
                    dash(&created.function.name),
                    dash(&created.function.id),
                    created.version
                );
            }
        }
        Some(before) => {
            let patch = FunctionPatch {
                publish: args.no_publish.then_some(false),
                ..fields
            };
            let updated = client.update_function(&args.name, &patch).await?;
            let function = &updated.function;
            if args.conn.json() {
                print_json(&updated);
            } else if let Some(v) = updated.published_version {
                println!(
                    "updated function {}, published version {v}",
                    dash(&function.name)
                );
            } else if args.no_publish && function.code_hash != before.code_hash {
                println!(
                    "updated function {}: staged, not published",
                    dash(&function.name)
                );
            } else {
                println!(
                    "function {}: no change (latest version {})",
                    dash(&function.name),
                    function.latest_version
                );
            }
        }
    }
    Ok(())
}

/// What a create and an update both send: code plus the flags that were given.
fn request_fields(args: &DeployArgs) -> anyhow::Result<FunctionPatch> {
    let mut fields = FunctionPatch::default();
    let meta = std::fs::metadata(&args.path)
        .with_context(|| format!("cannot read {}", args.path.display()))?;
    if meta.is_dir() {
        let archive = pack_dir(&args.path)?;
        fields.code_archive = Some(base64::engine::general_purpose::STANDARD.encode(archive));
    } else {
        let bytes = std::fs::read(&args.path)
            .with_context(|| format!("reading {}", args.path.display()))?;
        let source = String::from_utf8(bytes).map_err(|_| {
            anyhow::anyhow!(
                "{} is not UTF-8 text; deploy a directory to ship other files",
                args.path.display()
            )
        })?;
        fields.code = Some(source);
    }
    fields.runtime = args.runtime.clone();
    fields.handler = args.handler.clone();
    fields.memory_mb = args.memory;
    fields.timeout_sec = args.timeout;
    fields.network = args.network.clone();
    fields.description = args.description.clone();
    fields.max_instances = args.max_instances;
    fields.state_config = args.state.config();
    if !args.env.is_empty() {
        let env: BTreeMap<String, String> = args.env.iter().cloned().collect();
        nimbus_core::function::validate_env_vars(&env)
            .map_err(|e| anyhow::anyhow!("--env: {}", e.message))?;
        fields.env_vars = Some(env);
    }
    Ok(fields)
}

/// Directory and file names never deployed.
fn skipped(name: &str, is_dir: bool) -> bool {
    if is_dir {
        name == "__pycache__" || name == ".git"
    } else {
        name.ends_with(".pyc")
    }
}

/// Packs the files under `dir` into a tar.gz whose bytes depend only on the paths and contents.
pub fn pack_dir(dir: &Path) -> anyhow::Result<Vec<u8>> {
    let mut files = Vec::new();
    collect(dir, "", &mut files)?;
    files.sort();
    if files.is_empty() {
        bail!("{} holds no files to deploy", dir.display());
    }
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut builder = tar::Builder::new(gz);
    for (relative, path, executable) in files {
        let data = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_size(data.len() as u64);
        header.set_mode(if executable { 0o755 } else { 0o644 });
        header.set_mtime(0);
        builder
            .append_data(&mut header, &relative, data.as_slice())
            .with_context(|| format!("packing {relative}"))?;
    }
    let gz = builder.into_inner().context("packing the archive")?;
    gz.finish().context("compressing the archive")
}

/// Appends `(relative path, path, executable)` of every regular file under `dir`.
fn collect(dir: &Path, prefix: &str, out: &mut Vec<(String, PathBuf, bool)>) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("reading directory {}", dir.display()))?;
    for entry in entries {
        let entry = entry.with_context(|| format!("reading directory {}", dir.display()))?;
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            bail!("{}: file names must be UTF-8", path.display());
        };
        let relative = format!("{prefix}{name}");
        let kind = entry.file_type()?;
        if kind.is_dir() {
            if !skipped(&name, true) {
                collect(&path, &format!("{relative}/"), out)?;
            }
            continue;
        }
        // Symbolic links to files are followed; links to directories are not (no cycles).
        let meta = match std::fs::metadata(&path) {
            Ok(m) => m,
            Err(_) if kind.is_symlink() => {
                eprintln!(
                    "warning: skipping dangling symbolic link {}",
                    path.display()
                );
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        if meta.is_dir() {
            eprintln!(
                "warning: skipping symbolic link to a directory {}",
                path.display()
            );
        } else if meta.is_file() && !skipped(&name, false) {
            out.push((relative, path, meta.permissions().mode() & 0o111 != 0));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn env_pairs_are_checked() {
        assert_eq!(parse_env_pair("A=1").unwrap(), ("A".into(), "1".into()));
        assert_eq!(
            parse_env_pair("_X=a=b").unwrap(),
            ("_X".into(), "a=b".into())
        );
        assert_eq!(
            parse_env_pair("EMPTY=").unwrap(),
            ("EMPTY".into(), String::new())
        );
        assert!(parse_env_pair("novalue").unwrap_err().contains("KEY=VALUE"));
        assert!(parse_env_pair("1X=1")
            .unwrap_err()
            .contains("not a valid variable name"));
        assert!(parse_env_pair("=1").is_err());
        assert!(parse_env_pair("A-B=1").is_err());
        assert!(parse_env_pair("NIMBUS_X=1")
            .unwrap_err()
            .contains("reserved"));
    }

    fn unpack(archive: &[u8]) -> Vec<(String, Vec<u8>, u32)> {
        let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(archive));
        tar.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let path = e.path().unwrap().to_string_lossy().into_owned();
                let mode = e.header().mode().unwrap();
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                (path, data, mode)
            })
            .collect()
    }

    #[test]
    fn directories_pack_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("handler.py"), "from lib.util import f\n").unwrap();
        std::fs::create_dir_all(root.join("lib/__pycache__")).unwrap();
        std::fs::write(root.join("lib/util.py"), "def f(): return 1\n").unwrap();
        std::fs::write(root.join("lib/util.pyc"), b"\0\0").unwrap();
        std::fs::write(root.join("lib/__pycache__/util.cpython-311.pyc"), b"\0").unwrap();
        std::fs::create_dir_all(root.join(".git")).unwrap();
        std::fs::write(root.join(".git/HEAD"), "ref").unwrap();
        std::fs::write(root.join("run.sh"), "#!/bin/sh\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(root.join("run.sh"), std::fs::Permissions::from_mode(0o755))
            .unwrap();

        let archive = pack_dir(root).unwrap();
        let entries = unpack(&archive);
        let names: Vec<&str> = entries.iter().map(|(p, _, _)| p.as_str()).collect();
        assert_eq!(names, ["handler.py", "lib/util.py", "run.sh"]);
        assert_eq!(entries[1].1, b"def f(): return 1\n");
        assert_eq!(entries[0].2, 0o644);
        assert_eq!(entries[2].2, 0o755);
        // Deterministic: same tree, same bytes; and the server can read it.
        assert_eq!(pack_dir(root).unwrap(), archive);
        let bundle = nimbus_core::CodeBundle::from_archive(&archive).unwrap();
        assert_eq!(bundle.files().len(), 3);
    }

    #[test]
    fn empty_directories_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("__pycache__")).unwrap();
        let err = pack_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("no files"), "{err}");
    }
}
