//! The control socket `greyhook reload` and `greyhook status` talk to
//! (`reload`, `status`, `status json`, `db {JSON}` for `greyhook db`; one
//! command a connection, at most 4 KiB).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::Shared;
use super::status::Status;
use crate::frontend::listen::Listener;

/// The control socket: one command a connection (`reload` or `status`),
/// one line back.
pub(super) async fn control_service(listener: Listener, shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        let (conn, _) = tokio::select! {
            a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
            _ = shutdown.cancelled() => return,
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let (r, mut w) = tokio::io::split(conn);
            let mut line = String::new();
            let mut r = tokio::io::BufReader::new(r.take(4096));
            let read = tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut line)).await;
            let reply = match (read, line.trim()) {
                (Ok(Ok(_)), "reload") => match shared.reload().await {
                    Ok(o) => format!("ok {o}\n"),
                    Err(e) => format!("refused {e}\n"),
                },
                (Ok(Ok(_)), "status") => format!("ok {}\n", Status::gather(&shared).text()),
                (Ok(Ok(_)), "status json") => format!("ok {}\n", Status::gather(&shared).json()),
                (Ok(Ok(_)), l) if l.starts_with("db ") => match serde_json::from_str::<crate::admin::Command>(&l[3..]) {
                    Ok(cmd) => match crate::admin::run(&*shared.store, &cmd, shared.clock.now()).await {
                        Ok(text) => format!("ok {text}\n"),
                        Err(e) => format!("error {e}\n"),
                    },
                    Err(e) => format!("error bad db command: {e}\n"),
                },
                _ => "error expected `reload`, `status`, `status json` or `db {...}`\n".to_string(),
            };
            let _ = w.write_all(reply.as_bytes()).await;
        });
    }
}
