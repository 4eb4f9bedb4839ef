//! The resource limits one instance gets, checked before any group is touched.

use std::io;

/// Resource limits of one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Memory limit in bytes, swap not allowed beyond it.
    pub memory_bytes: u64,
    /// CPU weight on the cgroup v2 scale: 1–10000, 100 is the default share.
    pub cpu_weight: u32,
    /// Most processes and threads the instance may have at once.
    pub pids_max: u32,
}

impl Limits {
    /// Refuses limits no kernel would take.
    pub(super) fn validate(&self) -> io::Result<()> {
        let problem = if self.memory_bytes == 0 {
            "memory limit must be positive"
        } else if !(1..=10_000).contains(&self.cpu_weight) {
            "cpu weight must be between 1 and 10000"
        } else if self.pids_max == 0 {
            "pids limit must be positive"
        } else {
            return Ok(());
        };
        Err(io::Error::new(io::ErrorKind::InvalidInput, problem))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_validated() {
        let ok = Limits {
            memory_bytes: 1 << 20,
            cpu_weight: 100,
            pids_max: 1,
        };
        assert!(ok.validate().is_ok());
        for bad in [
            Limits {
                memory_bytes: 0,
                ..ok
            },
            Limits {
                cpu_weight: 0,
                ..ok
            },
            Limits {
                cpu_weight: 10_001,
                ..ok
            },
            Limits { pids_max: 0, ..ok },
        ] {
            assert_eq!(
                bad.validate().unwrap_err().kind(),
                io::ErrorKind::InvalidInput
            );
        }
    }
}
