//! What a start creates for the store, removed again if the start fails.
//!
//! Opening the embedded store creates its file and any missing directories
//! above it. Some refusals can only come after that: filters that share a
//! namespace by their names alone (known once they are loaded, which needs
//! the store), a listener's address in use, a second daemon's control
//! socket. Such a refused start must leave nothing behind, as one refused
//! before the store is opened does. Only what did not exist before the
//! start is removed, and a directory only while it is empty: a store that
//! was there before is never touched.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

/// The store file and the directories above it that did not exist before
/// a start; removed when dropped, unless [`Fresh::keep`] was called.
#[derive(Debug)]
pub(crate) struct Fresh {
    /// The file, if it did not exist.
    file: Option<PathBuf>,
    /// The directories above it that did not exist, deepest first.
    dirs: Vec<PathBuf>,
    /// Set by [`Fresh::keep`]: the start succeeded.
    kept: bool,
}

impl Fresh {
    /// Notes what of `path` (a file) and its directories does not exist
    /// yet. Call it before whatever creates them.
    pub(crate) fn before(path: &Path) -> Fresh {
        if exists(path) {
            return Fresh { file: None, dirs: Vec::new(), kept: false };
        }
        let mut dirs = Vec::new();
        let mut dir = path.parent();
        while let Some(d) = dir.filter(|d| !d.as_os_str().is_empty() && !exists(d)) {
            dirs.push(d.to_path_buf());
            dir = d.parent();
        }
        Fresh { file: Some(path.to_path_buf()), dirs, kept: false }
    }

    /// The start succeeded: what it created stays.
    pub(crate) fn keep(mut self) {
        self.kept = true;
    }
}

/// Whether `path` is there; a path that cannot be looked at counts as
/// there (it is never removed).
fn exists(path: &Path) -> bool {
    match std::fs::symlink_metadata(path) {
        Ok(_) => true,
        Err(e) => e.kind() != ErrorKind::NotFound,
    }
}

impl Drop for Fresh {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        if let Some(file) = &self.file {
            match std::fs::remove_file(file) {
                Ok(()) => tracing::info!("removed {}, created by the refused start", file.display()),
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => tracing::warn!("could not remove {}, created by the refused start: {e}", file.display()),
            }
        }
        // Deepest first, each only if empty: anything else put there since
        // stays, and so do the directories above it.
        for dir in &self.dirs {
            if std::fs::remove_dir(dir).is_err() {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_did_not_exist_is_removed_and_only_when_not_kept() {
        let root = tempfile::tempdir().unwrap();
        let file = root.path().join("a").join("b").join("store.db");
        let fresh = Fresh::before(&file);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, b"x").unwrap();
        drop(fresh);
        assert!(!root.path().join("a").exists());

        // Kept: everything stays.
        let fresh = Fresh::before(&file);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, b"x").unwrap();
        fresh.keep();
        assert!(file.exists());

        // There before: never removed.
        drop(Fresh::before(&file));
        assert!(file.exists());

        // A directory something else was put in meanwhile stays, and so
        // do those above it.
        let other = root.path().join("c").join("d").join("store.db");
        let fresh = Fresh::before(&other);
        std::fs::create_dir_all(other.parent().unwrap()).unwrap();
        std::fs::write(&other, b"x").unwrap();
        std::fs::write(other.parent().unwrap().join("theirs"), b"y").unwrap();
        drop(fresh);
        assert!(!other.exists() && other.parent().unwrap().join("theirs").exists());
    }
}
