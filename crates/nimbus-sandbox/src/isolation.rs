//! What the process driver needs to isolate workers: the cgroups, how to start the sandbox
//! [`init`](crate::init), and the per-instance settings it hands the init.
//!
//! Set up once at server start ([`Isolation::open`]): cgroups detected (v1 or v2) with
//! leftovers of a killed server removed, the empty mount point of sandbox roots created.
//! Per instance only a reused cgroup slot is taken and the init started.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::cgroup::{CgroupError, CgroupSlot, Cgroups, Limits};
use crate::init::InitSpec;
use crate::network::{NetworkError, Outbound, OutboundSpec};
use crate::LaunchSpec;
use nimbus_core::Network;

/// Host paths every worker may read besides its runtime and code: the shared libraries,
/// the dynamic loader's cache, time zones and TLS roots. Missing ones are skipped.
pub const SHARED_VISIBLE: &[&str] = &[
    "/usr/lib",
    "/usr/lib64",
    "/lib",
    "/lib64",
    "/etc/ld.so.cache",
    "/etc/localtime",
    "/usr/share/zoneinfo",
    "/etc/ssl/certs",
    "/usr/share/ca-certificates",
];

/// First host uid of sandboxes: slot `n` runs as `UID_BASE + 3n` (root inside) and
/// `UID_BASE + 3n + 1` (the worker); group `UID_BASE + 3n + 2` is its (unused) group 1.
/// Above the ranges hosts give accounts (local users,
/// subordinate ids, SSSD's default up to 2,000,200,000) and below 2^31, which some tools
/// misread as negative.
pub const UID_BASE: u32 = 2_100_000_000;

/// Memory a template's cgroup gets over its function's limit, MiB: the kernel memory of
/// each child it forks (page tables made at fork, the namespaces it sets up before it is
/// moved out) stays charged to the template's group while the child lives, some 100 KiB to
/// 1 MiB each.
const TEMPLATE_HEADROOM_MB: u32 = 256;
/// A template's process limit, in multiples of an instance's.
const TEMPLATE_PIDS_FACTOR: u32 = 16;

/// Tunables of isolation, with the defaults of the product.
#[derive(Debug, Clone)]
pub struct IsolationSettings {
    /// Program that runs the sandbox init, and its leading arguments.
    pub init: (PathBuf, Vec<String>),
    /// Name of Nimbus's cgroup in each hierarchy (`nimbus`).
    pub cgroup_name: String,
    /// Empty directory every sandbox mounts its new root on, inside its own mount
    /// namespace (the host sees nothing there). Every user must be able to enter its path,
    /// since the sandbox's root is an unprivileged host user.
    pub root_dir: PathBuf,
    /// Size of each worker's `/tmp`, MiB.
    pub tmp_mb: u32,
    /// Most processes (and threads) of one instance.
    pub pids_max: u32,
    /// Most open files of one worker.
    pub max_open_files: u64,
}

impl IsolationSettings {
    /// The defaults: roots on `/run/nimbus/sandbox-root`, `/tmp` of 64 MiB, 64 processes,
    /// 1024 open files.
    pub fn new(init: (PathBuf, Vec<String>)) -> Self {
        IsolationSettings {
            init,
            cgroup_name: "nimbus".into(),
            root_dir: PathBuf::from("/run/nimbus/sandbox-root"),
            tmp_mb: 64,
            pids_max: 64,
            max_open_files: 1024,
        }
    }
}

/// Why isolation cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum IsolationError {
    /// No usable cgroup controllers.
    #[error(transparent)]
    Cgroups(#[from] CgroupError),
    /// The mount point of sandbox roots could not be prepared.
    #[error("{}: {source}", path.display())]
    RootDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A sandbox asks for outbound network and this host cannot give it.
#[derive(Debug, thiserror::Error)]
#[error("outbound network is unavailable on this server: {0}")]
pub struct OutboundUnavailable(#[source] Arc<NetworkError>);

/// Isolation, ready to start sandboxes.
#[derive(Debug)]
pub struct Isolation {
    /// As configured.
    settings: IsolationSettings,
    /// The cgroups the slots come from.
    cgroups: Arc<Cgroups>,
    /// The empty mount point of sandbox roots.
    root_dir: PathBuf,
    /// Outbound networking, set up when a function first asks for it (it changes host-wide
    /// settings), or why this host cannot offer it.
    outbound: std::sync::OnceLock<Result<Outbound, Arc<NetworkError>>>,
}

impl Isolation {
    /// Detects cgroups, removes what a killed server left behind, and prepares the root
    /// mount point.
    pub fn open(settings: IsolationSettings) -> Result<Isolation, IsolationError> {
        let cgroups = Cgroups::open(&settings.cgroup_name)?;
        match cgroups.clean_leftovers() {
            Ok(0) => {}
            Ok(n) => tracing::warn!(groups = n, "removed sandboxes left by an earlier server"),
            Err(e) => tracing::warn!("could not clean up earlier sandboxes: {e}"),
        }
        let root_dir = settings.root_dir.clone();
        let io = |source| IsolationError::RootDir {
            path: root_dir.clone(),
            source,
        };
        std::fs::create_dir_all(&root_dir).map_err(io)?;
        for dir in [Some(root_dir.as_path()), root_dir.parent()]
            .into_iter()
            .flatten()
        {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(io)?;
        }
        Ok(Isolation {
            settings,
            cgroups,
            root_dir,
            outbound: std::sync::OnceLock::new(),
        })
    }

    /// One line for the start-up log.
    pub fn describe(&self) -> String {
        format!(
            "namespaces + seccomp + {}, /tmp {} MiB, {} processes, outbound network on first use",
            self.cgroups.describe(),
            self.settings.tmp_mb,
            self.settings.pids_max
        )
    }

    /// The directory of the sandboxes' host-side state (`/run/nimbus`).
    pub(crate) fn state_dir(&self) -> &std::path::Path {
        self.root_dir.parent().unwrap_or(&self.root_dir)
    }

    /// This server's own directory under [`Isolation::state_dir`]'s `kind` (named like its
    /// cgroups: one per data directory, so servers of one host never meet there).
    pub(crate) fn own_dir(&self, kind: &str) -> PathBuf {
        self.state_dir().join(kind).join(&self.settings.cgroup_name)
    }

    /// The program and arguments that start the init.
    pub(crate) fn init_command(&self) -> &(PathBuf, Vec<String>) {
        &self.settings.init
    }

    /// A cgroup slot with the instance's limits: memory as configured, CPU weight in
    /// proportion to memory (like the big platforms), and the process bound.
    pub(crate) fn slot(&self, memory_mb: u32) -> std::io::Result<CgroupSlot> {
        self.slot_with(memory_mb, self.settings.pids_max)
    }

    /// The slot of a template: its children are born in it and stay until the driver moves
    /// them to their own, so it holds many processes for a moment when instances start in
    /// a burst; and their page tables, made at fork, are charged to it.
    pub(crate) fn template_slot(&self, memory_mb: u32) -> std::io::Result<CgroupSlot> {
        self.slot_with(
            memory_mb + TEMPLATE_HEADROOM_MB,
            self.settings.pids_max * TEMPLATE_PIDS_FACTOR,
        )
    }

    /// A cgroup slot for `memory_mb` and `pids_max`.
    fn slot_with(&self, memory_mb: u32, pids_max: u32) -> std::io::Result<CgroupSlot> {
        let limits = Limits {
            memory_bytes: u64::from(memory_mb) << 20,
            cpu_weight: (memory_mb * 100 / 1024).clamp(1, 10_000),
            pids_max,
        };
        self.cgroups.acquire(&limits)
    }

    /// What the init needs to build the sandbox of `spec` in `slot`; an error if `spec`
    /// asks for a network this host cannot give.
    pub(crate) fn init_spec(
        &self,
        spec: &LaunchSpec,
        slot: &CgroupSlot,
    ) -> Result<InitSpec, OutboundUnavailable> {
        let mut visible: Vec<PathBuf> = SHARED_VISIBLE.iter().map(PathBuf::from).collect();
        visible.extend(spec.visible.iter().cloned());
        let outbound = self.outbound(spec.network)?;
        Ok(InitSpec {
            program: spec.program.clone(),
            args: spec.args.clone(),
            env: spec.env.clone(),
            workdir: spec.workdir.clone(),
            visible,
            host_id: UID_BASE + 3 * slot.index(),
            root_dir: self.root_dir.clone(),
            tmp_mb: self.settings.tmp_mb,
            max_open_files: self.settings.max_open_files,
            // The limit counts every process of the host uid, which a template shares with
            // all the instances forked from it: theirs is bounded by their pids cgroups.
            max_processes: match spec.template {
                true => u64::from(self.settings.pids_max) * 1024,
                false => u64::from(self.settings.pids_max),
            },
            outbound,
            template: spec.template,
        })
    }

    /// What a sandbox with `network` needs to get its link: none for an isolated one; an
    /// error if this host cannot give it outbound network.
    pub(crate) fn outbound(
        &self,
        network: Network,
    ) -> Result<Option<OutboundSpec>, OutboundUnavailable> {
        match network {
            Network::Isolated => Ok(None),
            Network::Outbound => match self.outbound.get_or_init(|| {
                let outbound = Outbound::open().map_err(Arc::new);
                match &outbound {
                    Ok(_) => tracing::info!("outbound network for sandboxes set up"),
                    Err(e) => {
                        tracing::warn!("functions with network \"outbound\" cannot run here: {e}")
                    }
                }
                outbound
            }) {
                Ok(outbound) => Ok(Some(outbound.spec())),
                Err(e) => Err(OutboundUnavailable(Arc::clone(e))),
            },
        }
    }

    /// Kills and removes every sandbox's cgroups (server shutdown), and this server's
    /// (empty by then) staging directory of restores.
    pub fn shutdown(&self) {
        let _ = std::fs::remove_dir(self.own_dir("restore"));
        if let Err(e) = self.cgroups.remove_all() {
            tracing::warn!("removing the sandboxes' cgroups: {e}");
        }
    }
}
