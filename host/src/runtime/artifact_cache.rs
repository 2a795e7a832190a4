//! The precompiled artifact cache: compiling a filter takes hundreds of
//! milliseconds, loading its compiled artifact well under one. Artifacts are
//! kept as `<sha256 of the component>-<engine compatibility hash>.cwasm` in
//! a directory greyhook creates with mode 0700.
//!
//! wasmtime runs the machine code in an artifact as it is, so only files
//! this cache wrote are ever loaded: the directory and the file must belong
//! to this process's user and be writable by nobody else, files are written
//! to a temporary name and renamed into place, and anything that fails to
//! load is deleted and compiled again.

use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::runtime::{CompiledFilter, LoadError, Runtime};

/// Where compiled filters are kept when `cache_dir` is not set:
/// `$CACHE_DIRECTORY/filters` (systemd's `CacheDirectory=`), else
/// `/var/cache/greyhook/filters` when it can be created and written (root),
/// else `$XDG_CACHE_HOME/greyhook/filters` or `~/.cache/greyhook/filters`;
/// `None` (compile at every start) when none of these can be named.
///
/// Never beside the store, whatever the store: artifacts are machine code
/// made again at will (tens of megabytes for some languages), not state to
/// back up or to copy to another machine with the store file.
pub fn default_dir() -> Option<PathBuf> {
    crate::settings::systemd_or_system("CACHE_DIRECTORY", "/var/cache/greyhook", "filters").or_else(|| {
        // The XDG base directory specification ignores a relative path.
        let xdg = std::env::var_os("XDG_CACHE_HOME").map(PathBuf::from).filter(|p| p.is_absolute());
        let home = || std::env::var_os("HOME").map(PathBuf::from).filter(|p| p.is_absolute()).map(|h| h.join(".cache"));
        xdg.or_else(home).map(|c| c.join("greyhook").join("filters"))
    })
}

/// A directory of compiled artifacts.
#[derive(Debug, Clone)]
pub struct ArtifactCache {
    dir: PathBuf,
    uid: u32,
}

/// Where a compiled filter came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Loaded from the cache.
    Cached,
    /// Compiled now (and written to the cache).
    Compiled,
}

fn private(meta: &std::fs::Metadata, uid: u32) -> bool {
    meta.uid() == uid && meta.mode() & 0o022 == 0
}

impl ArtifactCache {
    /// The directory artifacts are kept in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Opens (creating) the cache directory; refuses one that another user
    /// owns or that others can write.
    pub fn open(dir: &Path) -> std::io::Result<ArtifactCache> {
        std::fs::create_dir_all(dir)?;
        // Who we are, as the file system sees it: the owner of a file we create.
        let probe = dir.join(format!(".probe-{}", std::process::id()));
        std::fs::write(&probe, b"")?;
        let uid = std::fs::metadata(&probe)?.uid();
        std::fs::remove_file(&probe)?;
        let meta = std::fs::metadata(dir)?;
        if meta.uid() != uid {
            return Err(std::io::Error::other(format!("{} belongs to another user", dir.display())));
        }
        if meta.mode() & 0o077 != 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
        Ok(ArtifactCache { dir: dir.to_path_buf(), uid })
    }

    fn path(&self, runtime: &Runtime, bytes: &[u8]) -> PathBuf {
        let digest: String = Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect();
        self.dir.join(format!("{digest}-{:016x}.cwasm", runtime.compatibility_hash()))
    }

    /// Whether `bytes` has an artifact here (a compile will be a load).
    pub fn holds(&self, runtime: &Runtime, bytes: &[u8]) -> bool {
        std::fs::symlink_metadata(self.path(runtime, bytes)).is_ok_and(|m| m.is_file())
    }

    /// Deletes the artifact of `bytes` (a component that was refused: its
    /// artifact, tens of megabytes for some languages, would never be used).
    pub fn forget(&self, runtime: &Runtime, bytes: &[u8]) {
        let _ = std::fs::remove_file(self.path(runtime, bytes));
    }

    /// Deletes the artifacts not used (loaded or written) for `max_age`,
    /// and temporary files of writes that never finished: a cache that
    /// only grows would fill the disk with every version ever deployed.
    /// Returns how many files it removed.
    pub fn evict_unused(&self, max_age: std::time::Duration) -> usize {
        let Ok(dir) = std::fs::read_dir(&self.dir) else { return 0 };
        let now = std::time::SystemTime::now();
        let mut removed = 0;
        for e in dir.flatten() {
            let path = e.path();
            let ours = path.extension().is_some_and(|x| x == "cwasm" || x.to_string_lossy().starts_with("tmp"));
            let old = e.metadata().and_then(|m| m.modified()).is_ok_and(|t| now.duration_since(t).unwrap_or_default() > max_age);
            if ours && old && std::fs::remove_file(&path).is_ok() {
                removed += 1;
            }
        }
        removed
    }

    /// The compiled filter for `bytes`: from the cache, or compiled and cached.
    pub fn compile(&self, runtime: &Runtime, bytes: &[u8]) -> Result<(CompiledFilter, Origin), LoadError> {
        let path = self.path(runtime, bytes);
        if let Ok(meta) = std::fs::symlink_metadata(&path) {
            if meta.is_file() && private(&meta, self.uid) {
                // SAFETY: the file is in our private directory, owned by us,
                // writable only by us, named by the content's hash and this
                // engine's compatibility hash: this cache wrote it.
                match unsafe { runtime.deserialize_file(&path) } {
                    Ok(c) => {
                        // Used now: not evicted for its age.
                        let _ =
                            std::fs::File::options().append(true).open(&path).and_then(|f| f.set_modified(std::time::SystemTime::now()));
                        return Ok((c, Origin::Cached));
                    }
                    Err(e) => tracing::warn!("discarding cached artifact {}: {e}", path.display()),
                }
            }
            let _ = std::fs::remove_file(&path);
        }
        let compiled = runtime.compile(bytes)?;
        if let Err(e) = self.write(&path, &runtime.serialize(&compiled)?) {
            tracing::warn!("cannot cache the compiled filter in {}: {e}", self.dir.display());
        }
        Ok((compiled, Origin::Compiled))
    }

    fn write(&self, path: &Path, artifact: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        // Unique to this write: two daemons embedded in one process may
        // compile the same filter at once.
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = path.with_extension(format!("tmp{}-{n}", std::process::id()));
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
        f.write_all(artifact)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    }
}

#[cfg(all(test, feature = "reference-filter"))]
mod tests {
    use super::*;
    use crate::RuntimeConfig;

    #[test]
    fn compiles_once_then_loads_and_refuses_foreign_files() {
        let dir = tempfile::tempdir().unwrap();
        let rt = Runtime::new(RuntimeConfig::default()).unwrap();
        let cache = ArtifactCache::open(&dir.path().join("cache")).unwrap();
        let (_, o) = cache.compile(&rt, crate::REFERENCE_FILTER).unwrap();
        assert_eq!(o, Origin::Compiled);
        let (_, o) = cache.compile(&rt, crate::REFERENCE_FILTER).unwrap();
        assert_eq!(o, Origin::Cached);
        // A file others could have written is never loaded.
        let p = cache.path(&rt, crate::REFERENCE_FILTER);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
        let (_, o) = cache.compile(&rt, crate::REFERENCE_FILTER).unwrap();
        assert_eq!(o, Origin::Compiled);
        // Garbage under the right name is discarded and recompiled.
        std::fs::write(&p, b"garbage").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        let (_, o) = cache.compile(&rt, crate::REFERENCE_FILTER).unwrap();
        assert_eq!(o, Origin::Compiled);
        assert_eq!(cache.compile(&rt, crate::REFERENCE_FILTER).unwrap().1, Origin::Cached);
    }

    #[test]
    fn refused_and_unused_artifacts_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let rt = Runtime::new(RuntimeConfig::default()).unwrap();
        let cache = ArtifactCache::open(&dir.path().join("cache")).unwrap();
        cache.compile(&rt, crate::REFERENCE_FILTER).unwrap();
        assert!(cache.holds(&rt, crate::REFERENCE_FILTER));
        // Used a moment ago: kept by a day's age limit, removed by none.
        assert_eq!(cache.evict_unused(std::time::Duration::from_secs(86_400)), 0);
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(cache.evict_unused(std::time::Duration::from_millis(10)), 1);
        assert!(!cache.holds(&rt, crate::REFERENCE_FILTER));
        cache.compile(&rt, crate::REFERENCE_FILTER).unwrap();
        cache.forget(&rt, crate::REFERENCE_FILTER);
        assert!(!cache.holds(&rt, crate::REFERENCE_FILTER));
    }
}
