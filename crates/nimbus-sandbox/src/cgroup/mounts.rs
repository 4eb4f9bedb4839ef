//! Mount discovery: the lines of `/proc/self/mountinfo` the cgroup interfaces are found by.

use std::path::PathBuf;

/// Where the mount table of our mount namespace is read from.
pub(super) const MOUNTINFO: &str = "/proc/self/mountinfo";

/// One line of /proc/self/mountinfo, the fields we use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Mount {
    /// The directory of the filesystem mounted here (`/` for a hierarchy's root).
    pub root: String,
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// `cgroup`, `cgroup2`, `tmpfs`, …
    pub fs_type: String,
    /// The filesystem's own options (for a v1 hierarchy, its controllers and name).
    pub super_options: Vec<String>,
}

impl Mount {
    /// Whether `option` is among the super options.
    pub fn has_option(&self, option: &str) -> bool {
        self.super_options.iter().any(|o| o == option)
    }
}

/// The mounts of a mountinfo text; lines it cannot read are skipped.
pub(super) fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // After the optional fields, a "-" separates fs type, source and super options.
            let dash = fields.iter().skip(6).position(|f| *f == "-")? + 6;
            Some(Mount {
                root: unescape_mount_field(fields.get(3)?),
                mount_point: PathBuf::from(unescape_mount_field(fields.get(4)?)),
                fs_type: fields.get(dash + 1)?.to_string(),
                super_options: fields
                    .get(dash + 3)
                    .map(|o| o.split(',').map(str::to_string).collect())
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// Undoes the kernel's octal escapes (`\040` for a space) in mountinfo paths.
fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A hybrid host: v1 controllers, cpu co-mounted with cpuacct, an empty cgroup2, a bind
/// mount of a group, and a path with a space (for the tests of the interfaces too).
#[cfg(test)]
pub(super) const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
90 23 0:32 /some/group /mnt/mem\\040bind rw,relatime - cgroup cgroup rw,memory
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
42 27 0:39 / /run/nimbus-cgroup-x rw,relatime - cgroup cgroup rw,favordynmods,name=x
";

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn parses_mountinfo_lines() {
        let mounts = parse_mountinfo(HYBRID);
        assert_eq!(mounts.len(), 8);
        assert_eq!(
            mounts[1],
            Mount {
                root: "/".into(),
                mount_point: "/sys/fs/cgroup/cpu,cpuacct".into(),
                fs_type: "cgroup".into(),
                super_options: vec!["rw".into(), "cpu".into(), "cpuacct".into()],
            }
        );
        assert_eq!(mounts[3].root, "/some/group");
        assert_eq!(mounts[3].mount_point, Path::new("/mnt/mem bind"));
        assert_eq!(mounts[6].fs_type, "cgroup2");
        assert!(mounts[7].has_option("name=x") && mounts[7].has_option("favordynmods"));
    }
}
