//! Outbound network for sandboxes that ask for it (`"network": "outbound"`).
//!
//! Every sandbox has its own network namespace; by default it stays empty. An outbound one
//! gets a veth pair: `nmb<n>` on the host, `eth0` inside, on its own /30 of `10.213.0.0/16`
//! (host `.1`, sandbox `.2`, default route through the host). `n` is reserved host-wide
//! by the sandbox's init with a lock file under `/run/nimbus/net` held for the sandbox's
//! life, so several servers on one host never collide. The host
//! forwards and masquerades its traffic, with an nftables table `ip nimbus` that lets it
//! reach public addresses and the host's DNS resolvers only: nothing on the host itself,
//! no private, loopback, link-local (cloud metadata) or multicast ranges, no other sandbox,
//! and nothing may connect into a sandbox. The table is replaced (atomically) at every
//! start and left in place at exit, as other servers of the host may use it; its rules
//! match only `nmb*` interfaces, and a veth pair vanishes with its namespace.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

/// Why a sandbox cannot get its outbound network.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    /// A tool the outbound network is set up with is not installed.
    #[error("{0} not found (install iproute2 and nftables)")]
    ToolMissing(&'static str),
    /// The host refused to forward IPv4.
    #[error("enabling IPv4 forwarding: {0}")]
    Forwarding(#[source] std::io::Error),
    /// A file or directory of the host could not be used.
    #[error("{path}: {source}")]
    File {
        /// The file or directory.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Every link of the subnet is reserved.
    #[error("all {LINKS} outbound links are in use")]
    LinksInUse,
    /// A program could not be run.
    #[error("{}: {source}", program.display())]
    Spawn {
        /// The program.
        program: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A program ran and failed.
    #[error("{} {command}: {stderr}", program.display())]
    Failed {
        /// The program.
        program: PathBuf,
        /// Its arguments, joined.
        command: String,
        /// What it printed on its standard error.
        stderr: String,
    },
    /// `nft` could not be run or fed the ruleset.
    #[error("nft: {0}")]
    Nft(#[source] std::io::Error),
    /// `nft` refused the ruleset.
    #[error("nft rejected the ruleset: {0}")]
    NftRejected(String),
    /// The instance's network namespace could not be opened.
    #[error("the instance's network namespace: {0}")]
    Namespace(#[source] std::io::Error),
    /// The host could not enter the instance's network namespace.
    #[error("joining the instance's network namespace: {0}")]
    JoinNamespace(#[source] nix::Error),
    /// The thread configuring the instance's network panicked.
    #[error("configuring the instance's network panicked")]
    Panicked,
}

/// Addresses of outbound sandboxes: link `n` owns `10.213.0.0 + 4n` /30.
const SUBNET: [u8; 2] = [10, 213];
/// Links available in the subnet.
const LINKS: u32 = 1 << 14;
/// Where links are reserved.
const LOCK_DIR: &str = "/run/nimbus/net";

/// Destinations a sandbox may not reach, besides the host itself.
const BLOCKED: &str = "0.0.0.0/8, 10.0.0.0/8, 100.64.0.0/10, 127.0.0.0/8, 169.254.0.0/16, \
    172.16.0.0/12, 192.168.0.0/16, 224.0.0.0/4, 240.0.0.0/4";

/// One sandbox's network link.
#[derive(Debug, Clone)]
pub struct Link {
    /// Host-side interface name.
    pub host_if: String,
    /// Host-side address (the sandbox's gateway).
    pub host_addr: Ipv4Addr,
    /// The sandbox's address.
    pub sandbox_addr: Ipv4Addr,
    /// The `ip` program.
    pub ip: PathBuf,
}

/// Outbound networking, set up on first use.
#[derive(Debug)]
pub struct Outbound {
    /// The name servers sandboxes may reach.
    resolvers: Vec<Ipv4Addr>,
    /// The `ip` program.
    ip: PathBuf,
}

/// What the init needs to give a sandbox its link.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutboundSpec {
    /// The `ip` program (the init runs with an empty `PATH`).
    pub ip: PathBuf,
    /// Name servers for the sandbox's `/etc/resolv.conf`.
    pub resolvers: Vec<Ipv4Addr>,
}

/// An absolute path of `tool` in the usual system directories.
fn locate(tool: &'static str) -> Result<PathBuf, NetworkError> {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|dir| Path::new(dir).join(tool))
        .find(|path| path.is_file())
        .ok_or(NetworkError::ToolMissing(tool))
}

impl Outbound {
    /// (Re)installs the `inet nimbus` nftables table and enables IPv4 forwarding (a
    /// host-wide setting, so only once a function asks for outbound access). Fails when `ip`
    /// or `nft` is missing or refuses; outbound functions then cannot start here.
    pub fn open() -> Result<Outbound, NetworkError> {
        let ip = locate("ip")?;
        let nft = locate("nft")?;
        let resolvers = host_resolvers();
        let allowed_dns = if resolvers.is_empty() {
            String::new()
        } else {
            let list: Vec<String> = resolvers.iter().map(Ipv4Addr::to_string).collect();
            let set = list.join(", ");
            format!(
                "iifname \"nmb*\" ip daddr {{ {set} }} udp dport 53 accept\n\
                 iifname \"nmb*\" ip daddr {{ {set} }} tcp dport 53 accept\n"
            )
        };
        // One transaction: declare (so the delete cannot fail), delete, recreate. Servers of
        // one host share the table; none ever sees it missing.
        let ruleset = format!(
            "table inet nimbus\ndelete table inet nimbus\ntable inet nimbus {{\n\
             chain prerouting {{ type filter hook prerouting priority filter; \
             iifname \"nmb*\" fib saddr . iif oif missing drop; }}\n\
             chain postrouting {{ type nat hook postrouting priority srcnat; \
             ip saddr {a}.{b}.0.0/16 oifname != \"nmb*\" masquerade; }}\n\
             chain forward {{ type filter hook forward priority filter;\n\
             {allowed_dns}\
             iifname \"nmb*\" ip daddr {{ {BLOCKED} }} drop\n\
             oifname \"nmb*\" ct state established,related accept\n\
             oifname \"nmb*\" drop\n}}\n\
             chain input {{ type filter hook input priority filter; \
             iifname \"nmb*\" drop; }}\n}}\n",
            a = SUBNET[0],
            b = SUBNET[1],
        );
        nft_apply(&nft, &ruleset)?;
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(NetworkError::Forwarding)?;
        Ok(Outbound { resolvers, ip })
    }

    /// What a sandbox's init needs to attach it.
    pub fn spec(&self) -> OutboundSpec {
        OutboundSpec {
            ip: self.ip.clone(),
            resolvers: self.resolvers.clone(),
        }
    }
}

/// Reserves a free link host-wide. The returned file holds the reservation (an `flock`)
/// for as long as it stays open: the init keeps it for the sandbox's life, and the kernel
/// releases it however the init ends.
pub(crate) fn reserve(spec: &OutboundSpec) -> Result<(Link, std::fs::File), NetworkError> {
    use std::os::fd::AsRawFd;
    std::fs::create_dir_all(LOCK_DIR).map_err(|source| NetworkError::File {
        path: LOCK_DIR.to_owned(),
        source,
    })?;
    for n in 0..LINKS {
        let path = format!("{LOCK_DIR}/{n}");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| NetworkError::File {
                path: path.clone(),
                source,
            })?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            let base = u32::from(Ipv4Addr::new(SUBNET[0], SUBNET[1], 0, 0)) + 4 * n;
            let link = Link {
                host_if: format!("nmb{n}"),
                host_addr: Ipv4Addr::from(base + 1),
                sandbox_addr: Ipv4Addr::from(base + 2),
                ip: spec.ip.clone(),
            };
            return Ok((link, file));
        }
    }
    Err(NetworkError::LinksInUse)
}

/// Runs `program` with `args`; the error names the command and what it printed.
fn run(program: &Path, args: &[&str]) -> Result<(), NetworkError> {
    let out = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|source| NetworkError::Spawn {
            program: program.to_path_buf(),
            source,
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetworkError::Failed {
            program: program.to_path_buf(),
            command: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Applies `ruleset` with `nft -f -`, in one transaction.
fn nft_apply(nft: &Path, ruleset: &str) -> Result<(), NetworkError> {
    use std::io::Write;
    let mut child = Command::new(nft)
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(NetworkError::Nft)?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(ruleset.as_bytes())
        .map_err(NetworkError::Nft)?;
    let out = child.wait_with_output().map_err(NetworkError::Nft)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetworkError::NftRejected(
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ))
    }
}

/// The host's IPv4 name servers that a sandbox can reach (not loopback ones, such as a
/// local stub resolver).
fn host_resolvers() -> Vec<Ipv4Addr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<Ipv4Addr>().ok())
        .filter(|a| !a.is_loopback())
        .collect()
}

/// Host side, for the init: creates the veth pair with its peer in the namespace of
/// `pid`, addresses and raises the host end (IPv6 off: the filter is IPv4's).
pub(crate) fn attach(link: &Link, pid: i32) -> Result<(), NetworkError> {
    let pid = pid.to_string();
    let add = [
        "link",
        "add",
        &link.host_if,
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &pid,
    ];
    if run(&link.ip, &add).is_err() {
        // A pair of a namespace that just ended may still be on its way out.
        let _ = run(&link.ip, &["link", "del", &link.host_if]);
        run(&link.ip, &add)?;
    }
    disable_ipv6(&link.host_if)?;
    let host = format!("{}/30", link.host_addr);
    run(&link.ip, &["addr", "add", &host, "dev", &link.host_if])?;
    run(&link.ip, &["link", "set", &link.host_if, "up"])
}

/// Host side, for a process forked from a template: it entered an empty network namespace
/// of its own and has no capabilities left, so the host attaches its link and configures
/// the inside too, from a thread that joins that namespace (and ends with it).
pub(crate) fn attach_forked(link: &Link, pid: i32) -> Result<(), NetworkError> {
    attach(link, pid)?;
    let namespace =
        std::fs::File::open(format!("/proc/{pid}/ns/net")).map_err(NetworkError::Namespace)?;
    let link = link.clone();
    std::thread::spawn(move || {
        nix::sched::setns(namespace, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(NetworkError::JoinNamespace)?;
        configure_inside(&link)
    })
    .join()
    .map_err(|_| NetworkError::Panicked)?
}

/// Sandbox side, for its PID 1 before it leaves the host's file system: no IPv6 (no
/// link-local path to the host), addresses `eth0`, raises it and loopback, routes through
/// the host.
pub(crate) fn configure_inside(link: &Link) -> Result<(), NetworkError> {
    disable_ipv6("all")?;
    disable_ipv6("default")?;
    let addr = format!("{}/30", link.sandbox_addr);
    run(&link.ip, &["addr", "add", &addr, "dev", "eth0"])?;
    run(&link.ip, &["link", "set", "eth0", "up"])?;
    run(&link.ip, &["link", "set", "lo", "up"])?;
    run(
        &link.ip,
        &[
            "route",
            "add",
            "default",
            "via",
            &link.host_addr.to_string(),
        ],
    )
}

/// Turns IPv6 off for `interface` (or `all`, `default`) of the caller's network namespace.
fn disable_ipv6(interface: &str) -> Result<(), NetworkError> {
    let path = format!("/proc/sys/net/ipv6/conf/{interface}/disable_ipv6");
    match std::fs::write(&path, "1") {
        Ok(()) => Ok(()),
        // A kernel without IPv6 has nothing to turn off.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(NetworkError::File { path, source }),
    }
}
