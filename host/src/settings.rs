//! What every settings table shares: durations written as text (`"300s"`,
//! `"5m"`), bounded so that adding one to "now" never overflows.
//!
//! Each part of greyhook owns its settings: a front end its table
//! (`[policy]`, `[milter]`, `[smtp]`, `[opensmtpd]`, see
//! [`crate::frontend`]), the store `[store]` ([`crate::store::StoreConfig`]),
//! a filter `[filter]` ([`crate::daemon::FilterConfig`]). Every key is in
//! `docs/configuration.md`, which a test checks against these types.

use std::time::Duration;

/// The longest duration any setting takes: ten years. Every timeout, TTL
/// and interval is added to "now" somewhere; a value near `u64::MAX`
/// seconds (which `humantime` parses) would overflow that addition and
/// panic the task holding a peer's connection.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 366 * 24 * 3600);

/// Deserializes a humantime duration (`"300s"`, `"5m"`, `"100d"`) of at
/// most [`MAX_DURATION`]; for `#[serde(deserialize_with = ...)]`.
pub fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let v: Duration = humantime_serde::deserialize(d)?;
    if v > MAX_DURATION {
        return Err(serde::de::Error::custom(format!(
            "{} is longer than the 10 years any duration may be",
            humantime_serde::re::humantime::format_duration(v)
        )));
    }
    Ok(v)
}

/// `$ENV/file` when systemd set `ENV`, else `system/file` when that
/// directory can be created and written.
pub(crate) fn systemd_or_system(env: &str, system: &str, file: &str) -> Option<std::path::PathBuf> {
    systemd_dir(env, file).or_else(|| writable_system_dir(system, file))
}

/// `$ENV/file` when systemd (`StateDirectory=`, `CacheDirectory=`, …) set
/// `ENV` to a directory.
pub(crate) fn systemd_dir(env: &str, file: &str) -> Option<std::path::PathBuf> {
    std::env::var_os(env).filter(|d| !d.is_empty()).map(|d| std::path::PathBuf::from(d).join(file))
}

/// `system/file` when the directory `system` can be created and written.
pub(crate) fn writable_system_dir(system: &str, file: &str) -> Option<std::path::PathBuf> {
    let system = std::path::PathBuf::from(system);
    let probe = system.join(".greyhook-write-test");
    let writable = std::fs::create_dir_all(&system).is_ok() && std::fs::write(&probe, b"").is_ok();
    let _ = std::fs::remove_file(&probe);
    writable.then(|| system.join(file))
}

/// What identifies a file's content without reading it: modification
/// time, length, device and inode (a tool that writes a new file and
/// renames it over the old one, or moves a symlink, changes the inode even
/// within one clock tick). `None` when the file cannot be looked at.
type FileStamp = Option<(std::time::SystemTime, u64, u64, u64)>;

/// The [`FileStamp`] of `path`, following symlinks (certbot's `live/`
/// names are links into `archive/`, and a renewal moves the links).
fn file_stamp(path: &std::path::Path) -> FileStamp {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len(), m.dev(), m.ino()))
}

/// Files watched for a change by their [`FileStamp`]s, for what greyhook
/// reads again when an operator replaces it (TLS certificates).
#[derive(Debug)]
pub(crate) struct FileWatch {
    paths: Vec<std::path::PathBuf>,
    seen: std::sync::Mutex<Vec<FileStamp>>,
}

impl FileWatch {
    /// Watches `paths`, as they are now (take it before reading them: a
    /// change during the read is then seen by the next [`FileWatch::changed`]).
    pub(crate) fn new(paths: Vec<std::path::PathBuf>) -> FileWatch {
        let seen = paths.iter().map(|p| file_stamp(p)).collect();
        FileWatch { paths, seen: std::sync::Mutex::new(seen) }
    }

    /// Whether any file changed since the last look. The change is
    /// recorded before the caller reads the files, so a set that does not
    /// load is reported once, not at every look until the next change.
    pub(crate) fn changed(&self) -> bool {
        let now: Vec<FileStamp> = self.paths.iter().map(|p| file_stamp(p)).collect();
        let mut seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if *seen == now {
            return false;
        }
        *seen = now;
        true
    }
}

/// Reads the file at `path`, at most `max` bytes: a larger file (or a
/// device that never ends, like `/dev/zero`, or a FIFO that streams) is an
/// `InvalidData` error naming the limit, not a read that takes every byte
/// of memory. What it reads are an operator's files (the configuration,
/// a filter), read again at each hot reload.
///
/// A regular file past `max` is refused by its size, unread. The buffer is
/// sized once (a regular file's size, else `max`, reserved but not touched
/// until read) instead of doubling as it fills: an allocator that grows a
/// large buffer by copying (not every one remaps in place) would otherwise
/// hold the old and the new buffer at once, twice `max` for `/dev/zero`.
pub(crate) fn read_bounded(path: &std::path::Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let too_large = || std::io::Error::new(std::io::ErrorKind::InvalidData, format!("larger than {max} bytes"));
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    if meta.is_file() && meta.len() > max {
        return Err(too_large());
    }
    // One more byte than the limit, to tell a file of exactly `max` bytes
    // from a longer one; a regular file that grew meanwhile still stops at it.
    let expected = if meta.is_file() { meta.len() } else { max };
    let mut out = Vec::new();
    // (Only an address-space limit refuses the reservation: then the
    // buffer grows as it fills.)
    let _ = out.try_reserve_exact(usize::try_from(expected.saturating_add(1)).unwrap_or(usize::MAX));
    file.take(max.saturating_add(1)).read_to_end(&mut out)?;
    if out.len() as u64 > max {
        return Err(too_large());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::read_bounded;

    /// A file of exactly the limit is read into a buffer of its size (no
    /// doubling); one byte more is refused unread; a device that never ends
    /// is refused at the limit.
    #[test]
    fn files_are_read_up_to_their_bound_into_one_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![b'x'; 100_000]).unwrap();
        let read = read_bounded(&path, 100_000).unwrap();
        assert_eq!(read.len(), 100_000);
        assert!(read.capacity() <= 100_001, "sized once: {}", read.capacity());
        let e = read_bounded(&path, 99_999).unwrap_err();
        assert_eq!((e.kind(), e.to_string()), (std::io::ErrorKind::InvalidData, "larger than 99999 bytes".to_string()));
        let e = read_bounded(std::path::Path::new("/dev/zero"), 4096).unwrap_err();
        assert_eq!(e.to_string(), "larger than 4096 bytes");
        assert!(read_bounded(&dir.path().join("none"), 10).is_err());
    }
}
