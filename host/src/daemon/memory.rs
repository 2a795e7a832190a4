//! The process's memory as the kernel counts it, for `greyhook status` and
//! the metrics: what the daemon holds now and at most since it started.
//! At millions of records most of it is the store's page cache (`[store]
//! cache_mib`), so an operator can see the bound at work.

/// The process's resident memory now and its peak, in bytes (`VmRSS` and
/// `VmHWM` of `/proc/self/status`); `None` where there is no `/proc`.
pub fn resident_now() -> Option<Resident> {
    Resident::parse(&std::fs::read_to_string("/proc/self/status").ok()?)
}

/// Resident memory, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Resident {
    /// Resident now.
    pub bytes: u64,
    /// The most it has been since the process started.
    pub peak_bytes: u64,
}

impl Resident {
    /// Reads `VmRSS` and `VmHWM` (in kB) out of a `/proc/PID/status` text.
    fn parse(status: &str) -> Option<Resident> {
        let kib = |name: &str| -> Option<u64> {
            let value = status.lines().find_map(|l| l.strip_prefix(name))?;
            value.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()?.checked_mul(1024)
        };
        Some(Resident { bytes: kib("VmRSS:")?, peak_bytes: kib("VmHWM:")? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resident_memory_is_read_from_proc_status() {
        let text = "Name:\tgreyhook\nVmHWM:\t  230000 kB\nVmRSS:\t  199000 kB\nThreads:\t9\n";
        assert_eq!(Resident::parse(text), Some(Resident { bytes: 199_000 * 1024, peak_bytes: 230_000 * 1024 }));
        assert_eq!(Resident::parse("VmRSS:\t1 kB\n"), None, "no peak");
        assert_eq!(Resident::parse("VmRSS:\tmany kB\nVmHWM:\t1 kB\n"), None);
        assert_eq!(Resident::parse("VmRSS:\t99999999999999999999 kB\nVmHWM:\t1 kB\n"), None);
        let now = resident_now().expect("/proc on Linux");
        assert!(now.bytes > 1 << 20 && now.peak_bytes >= now.bytes, "{now:?}");
    }
}
