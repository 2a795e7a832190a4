//! What makes the daemon reload by itself: the filter and configuration
//! files changing, and the crash-loop breaker.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::runtime::reload::BreakerConfig;

/// Watches `files` (through their directories, so an atomic rename into
/// place is seen) and reloads, debounced, when one changes.
pub(super) fn watch(
    files: Vec<PathBuf>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, notify::Error> {
    use notify::Watcher;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(16);
    let names: Vec<PathBuf> = files.iter().map(|f| std::path::absolute(f).unwrap_or_else(|_| f.clone())).collect();
    let wanted = names.clone();
    let mut watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(ev) = ev {
            let relevant = !matches!(ev.kind, notify::EventKind::Access(_)) && ev.paths.iter().any(|p| wanted.iter().any(|w| w == p));
            if relevant {
                let _ = tx.try_send(());
            }
        }
    })?;
    let mut dirs: Vec<PathBuf> = names.iter().filter_map(|n| n.parent().map(Path::to_path_buf)).collect();
    dirs.sort();
    dirs.dedup();
    for d in &dirs {
        watcher.watch(d, notify::RecursiveMode::NonRecursive)?;
    }
    Ok(tokio::spawn(async move {
        let _watcher = watcher;
        loop {
            tokio::select! {
                m = rx.recv() => if m.is_none() { return },
                _ = shutdown.cancelled() => return,
            }
            // Debounce: an editor or `cp` writes in several steps.
            tokio::time::sleep(Duration::from_millis(200)).await;
            while rx.try_recv().is_ok() {}
            let _ = shared.reload().await;
        }
    }))
}

/// Samples the filter's failures every window and trips the breaker.
pub(super) async fn watch_breaker(shared: Arc<Shared>, link: usize, config: BreakerConfig, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(config.window);
    loop {
        tokio::select! {
            _ = tick.tick() => if let Some(why) = shared.reloaders[link].check_breaker(&config).await {
                let name = shared.reloaders[link].filter().info().name.clone();
                crate::telemetry::host().breaker_trips.get_or_create(&crate::telemetry::FilterLabel { filter: name }).inc();
                shared.record_reload(link, false, format!("reverted: {why}"), "reverted");
            },
            _ = shutdown.cancelled() => return,
        }
    }
}
