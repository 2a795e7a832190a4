//! The control socket `greyhook reload` and `greyhook status` talk to
//! (`reload`, `status`, `status json`, `db {JSON}` for `greyhook db`; one
//! command a connection, at most 4 KiB, read within 5 s and its answer
//! taken within 5 s; at most [`MAX_CONTROL_CONNECTIONS`] at once).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::status::Status;
use crate::frontend::listen::Listener;

/// Most control connections served at once; more are closed at once
/// (the socket is the operator's: this bounds what a stuck script holds).
const MAX_CONTROL_CONNECTIONS: usize = 16;

/// How long a control connection has to send its command, and to take
/// the answer.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);

/// The control socket: one command a connection (`reload` or `status`),
/// one line back.
pub(super) async fn control_service(listener: Listener, shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut failures = crate::frontend::listen::AcceptFailures::new("control");
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONTROL_CONNECTIONS));
    loop {
        let (conn, _) = tokio::select! {
            // A failed accept (out of file descriptors) is retried after a
            // back-off: retried at once, it would spin a core until the
            // shortage ends.
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    failures.failed(&e).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!("control socket: {MAX_CONTROL_CONNECTIONS} connections in hand already; one closed");
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let (r, mut w) = tokio::io::split(conn);
            let mut line = String::new();
            let mut r = tokio::io::BufReader::new(r.take(4096));
            let read = tokio::time::timeout(CONTROL_TIMEOUT, r.read_line(&mut line)).await;
            let reply = match (read, line.trim()) {
                (Ok(Ok(_)), "reload") => match shared.reload().await {
                    Ok(o) => format!("ok {o}\n"),
                    Err(e) => format!("refused {e}\n"),
                },
                (Ok(Ok(_)), "status") => format!("ok {}\n", Status::gather(&shared).text()),
                (Ok(Ok(_)), "status json") => format!("ok {}\n", Status::gather(&shared).json()),
                (Ok(Ok(_)), l) if l.starts_with("db ") => match serde_json::from_str::<crate::admin::Command>(&l[3..]) {
                    Ok(cmd) => {
                        match crate::admin::run(&*shared.store, &cmd, shared.clock.now(), shared.client_grouping(cmd.namespace())).await {
                            Ok(text) => format!("ok {text}\n"),
                            Err(e) => format!("error {e}\n"),
                        }
                    }
                    Err(e) => format!("error bad db command: {e}\n"),
                },
                _ => "error expected `reload`, `status`, `status json` or `db {...}`\n".to_string(),
            };
            let _ = tokio::time::timeout(CONTROL_TIMEOUT, w.write_all(reply.as_bytes())).await;
        });
    }
}
