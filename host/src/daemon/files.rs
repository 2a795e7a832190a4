//! The process's open-files limit (`RLIMIT_NOFILE`) against what the
//! configured connection limits let peers hold.
//!
//! Every connection is a file descriptor, and a process out of them can
//! accept no peer, connect to no next hop and open no DNS socket. The usual
//! soft limit is 1024 (systemd's default for services, and most shells'),
//! below what the front ends' defaults allow together (a policy and a
//! milter service at 512 connections each). So the `greyhook` binary
//! raises its soft limit to the hard one at start, as systemd advises
//! services that need many descriptors to do ([`raise_open_files_limit`]),
//! and the daemon warns at start when the limit is still below what its
//! settings need ([`OpenFiles::check`]).

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Descriptors counted for what is not a peer's connection: the listeners,
/// the store's files or connections, the log, the compiled-filter cache,
/// DNS sockets in flight, the control socket's connections and the
/// metrics listener's.
pub const RESERVED_FILES: u64 = 256;

/// The process's open-files limit, and what the settings need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenFiles {
    /// The soft limit in force (`None`: unlimited).
    pub limit: Option<u64>,
    /// What the settings let peers hold at most, by front end or listener
    /// (`reserved` is [`RESERVED_FILES`]).
    pub needed: Vec<(&'static str, u64)>,
}

impl OpenFiles {
    /// The limit now, against `needed` (plus [`RESERVED_FILES`]).
    pub fn now(mut needed: Vec<(&'static str, u64)>) -> OpenFiles {
        needed.push(("reserved", RESERVED_FILES));
        OpenFiles { limit: limit_now(), needed }
    }

    /// The total needed.
    pub fn total(&self) -> u64 {
        self.needed.iter().map(|(_, n)| n).sum()
    }

    /// A warning for the log when the limit is below the total.
    pub fn check(&self) -> Result<(), String> {
        match self.limit {
            Some(limit) if limit < self.total() => {
                let parts: Vec<String> = self.needed.iter().map(|(name, n)| format!("{name} {n}")).collect();
                Err(format!(
                    "the open-files limit is {limit}, below the {} file descriptors the connection limits let peers hold \
                     ({}): past it greyhook can accept no connection and open no next-hop or DNS socket. \
                     Raise it (systemd: LimitNOFILE=; a shell: ulimit -n) or lower max_connections",
                    self.total(),
                    parts.join(", ")
                ))
            }
            _ => Ok(()),
        }
    }
}

/// The soft limit in force now (`None`: unlimited).
pub fn limit_now() -> Option<u64> {
    getrlimit(Resource::Nofile).current
}

/// The file descriptors this process has open now (`/proc/self/fd`, less
/// the one that reads it); `None` where there is no `/proc`.
pub fn open_now() -> Option<u64> {
    std::fs::read_dir("/proc/self/fd").ok().map(|d| (d.count() as u64).saturating_sub(1))
}

/// Raises the soft open-files limit to the hard one, and returns the
/// limits before and after (`None`: unlimited). A library embedding the
/// daemon decides this for itself; the `greyhook` binary calls it at
/// start.
pub fn raise_open_files_limit() -> std::io::Result<(Option<u64>, Option<u64>)> {
    let before = getrlimit(Resource::Nofile);
    if before.current == before.maximum {
        return Ok((before.current, before.current));
    }
    setrlimit(Resource::Nofile, Rlimit { current: before.maximum, maximum: before.maximum })?;
    Ok((before.current, getrlimit(Resource::Nofile).current))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_check_names_each_part_and_the_remedy() {
        let f = OpenFiles { limit: Some(1024), needed: vec![("policy", 513), ("milter", 513), ("reserved", RESERVED_FILES)] };
        let e = f.check().unwrap_err();
        assert!(e.contains("1024") && e.contains("1282") && e.contains("milter 513") && e.contains("LimitNOFILE"), "{e}");
        assert!(OpenFiles { limit: Some(4096), ..f.clone() }.check().is_ok());
        assert!(OpenFiles { limit: None, ..f }.check().is_ok());
    }
}
