//! Listening addresses shared by the front ends: TCP (`127.0.0.1:10023`,
//! `[::1]:10023`) or a unix socket (`unix:/run/greyhook/policy.sock`) with a
//! mode and an owner, so Postfix's `check_policy_service unix:...` can reach it.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;

use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Where a front end listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A unix socket path.
    Unix(PathBuf),
}

/// A bad address or a failed bind.
#[derive(Debug, Error)]
pub enum ListenError {
    /// The address does not parse.
    #[error("invalid listen address {0:?}: use HOST:PORT (127.0.0.1:10023, [::1]:10023) or unix:/path")]
    Parse(String),
    /// Binding failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The error.
        source: std::io::Error,
    },
    /// A live process answers on the unix socket already.
    #[error("{0} is in use: another process (a running greyhook?) answers on it; stop it or choose another path")]
    InUse(String),
    /// The socket's owner or mode could not be set.
    #[error("cannot set owner/mode of {path}: {reason}")]
    Permissions {
        /// The socket path.
        path: String,
        /// Why.
        reason: String,
    },
}

impl std::str::FromStr for ListenAddr {
    type Err = ListenError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err(ListenError::Parse(s.into()));
            }
            return Ok(ListenAddr::Unix(PathBuf::from(p)));
        }
        let s2 = s.strip_prefix("inet:").unwrap_or(s);
        s2.parse().map(ListenAddr::Tcp).map_err(|_| ListenError::Parse(s.into()))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl<'de> serde::Deserialize<'de> for ListenAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Who owns a unix socket and its mode.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnixPerms {
    /// File mode, e.g. `0o660`.
    pub mode: Option<u32>,
    /// Owner user (name or number).
    pub owner: Option<String>,
    /// Owner group (name or number).
    pub group: Option<String>,
}

impl UnixPerms {
    /// The permissions a front end's table names: `socket_mode` (octal
    /// text, `"0660"`), `socket_owner`, `socket_group`.
    pub fn from_settings(mode: &Option<String>, owner: &Option<String>, group: &Option<String>) -> Result<UnixPerms, String> {
        let mode = match mode {
            Some(m) => Some(
                u32::from_str_radix(m.trim_start_matches("0o"), 8)
                    .ok()
                    .filter(|m| *m <= 0o7777)
                    .ok_or_else(|| format!("socket_mode {m:?} is not an octal mode (e.g. \"0660\")"))?,
            ),
            None => None,
        };
        Ok(UnixPerms { mode, owner: owner.clone(), group: group.clone() })
    }
}

/// The send buffer of every TCP connection a mail front end accepts
/// (`SO_SNDBUF`, set on the listener; Linux doubles it for its own
/// bookkeeping). Left alone, the kernel grows a connection's send buffer up
/// to `tcp_wmem`'s maximum (4 MiB by default), so a peer that pipelines
/// requests and never reads the answers could make greyhook hold megabytes
/// of kernel memory for every connection until the write deadline cuts it
/// off (measured: 2.7 MB). Replies, policy answers and milter replies are a
/// few hundred bytes a command, so a fixed 64 KiB costs nothing.
pub const PEER_SEND_BUFFER: usize = 64 * 1024;

/// A stream from either kind of listener.
pub type Conn = Pin<Box<dyn AsyncReadWrite>>;

/// What a connection is: bytes both ways.
pub trait AsyncReadWrite: AsyncRead + AsyncWrite + Send {
    /// Sends the ACK for what was read now instead of after the kernel's
    /// delayed-ACK timer (TCP on Linux; nothing elsewhere). For protocols
    /// whose peer sends packets that get no reply and does not disable
    /// Nagle (Postfix's milter client), or its next packet waits 40 ms.
    fn ack_now(&self) {}
}

impl AsyncReadWrite for tokio::net::TcpStream {
    fn ack_now(&self) {
        #[cfg(target_os = "linux")]
        let _ = self.set_quickack(true);
    }
}

impl AsyncReadWrite for tokio::net::UnixStream {}
impl AsyncReadWrite for tokio::io::Empty {}
impl AsyncReadWrite for Conn {
    fn ack_now(&self) {
        self.as_ref().get_ref().ack_now();
    }
}
impl<S: AsyncReadWrite + Unpin> AsyncReadWrite for tokio_rustls::server::TlsStream<S> {}

/// A bound listener.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix socket, removed again when dropped if it is still the one
    /// bound (device and inode checked).
    Unix(UnixListener, PathBuf, Option<(u64, u64)>),
}

/// Looks a user or group up by name in `/etc/passwd` or `/etc/group` (or
/// takes a number). Written by hand: std has `chown` but no name lookup, and
/// a libc binding for one call is not worth it.
fn lookup_id(name: &str, file: &str) -> Result<u32, String> {
    if let Ok(n) = name.parse() {
        return Ok(n);
    }
    let text = std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))?;
    text.lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let n = f.next()?;
            let id = f.nth(1)?.parse().ok()?;
            (n == name).then_some(id)
        })
        .next()
        .ok_or_else(|| format!("no {name:?} in {file}"))
}

impl Listener {
    /// Binds `addr`. A unix socket left over from a previous run (nobody
    /// answers on it) is replaced; one a live process answers on is not
    /// taken over: [`ListenError::InUse`].
    pub async fn bind(addr: &ListenAddr, perms: &UnixPerms) -> Result<Listener, ListenError> {
        let bind_err = |source| ListenError::Bind { addr: addr.to_string(), source };
        match addr {
            ListenAddr::Tcp(a) => {
                let l = TcpListener::bind(a).await.map_err(bind_err)?;
                // Connections accepted later inherit the listener's buffer
                // size and TCP_NODELAY (replies go out at once): no system
                // call a connection for either.
                let sock = socket2::SockRef::from(&l);
                sock.set_send_buffer_size(PEER_SEND_BUFFER).map_err(bind_err)?;
                sock.set_tcp_nodelay(true).map_err(bind_err)?;
                Ok(Listener::Tcp(l))
            }
            ListenAddr::Unix(p) => {
                if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(bind_err)?;
                }
                if p.exists() {
                    if std::os::unix::net::UnixStream::connect(p).is_ok() {
                        return Err(ListenError::InUse(p.display().to_string()));
                    }
                    std::fs::remove_file(p).map_err(bind_err)?;
                }
                let l = UnixListener::bind(p).map_err(bind_err)?;
                let id = file_id(p);
                let perm_err = |reason: String| ListenError::Permissions { path: p.display().to_string(), reason };
                if perms.owner.is_some() || perms.group.is_some() {
                    let uid = perms.owner.as_deref().map(|o| lookup_id(o, "/etc/passwd")).transpose().map_err(perm_err)?;
                    let gid = perms.group.as_deref().map(|g| lookup_id(g, "/etc/group")).transpose().map_err(perm_err)?;
                    std::os::unix::fs::chown(p, uid, gid).map_err(|e| perm_err(e.to_string()))?;
                }
                if let Some(mode) = perms.mode {
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).map_err(|e| perm_err(e.to_string()))?;
                }
                Ok(Listener::Unix(l, p.clone(), id))
            }
        }
    }

    /// The bound address (with the real port when bound to port 0).
    pub fn local_addr(&self) -> ListenAddr {
        match self {
            Listener::Tcp(l) => ListenAddr::Tcp(l.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))),
            Listener::Unix(_, p, _) => ListenAddr::Unix(p.clone()),
        }
    }

    /// Accepts a connection: the stream and a peer description for logs.
    pub async fn accept(&self) -> std::io::Result<(Conn, String)> {
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                Ok((Box::pin(s), crate::domain::socket_addr_text(peer)))
            }
            Listener::Unix(l, p, _) => {
                let (s, _) = l.accept().await?;
                Ok((Box::pin(s), format!("unix:{}", p.display())))
            }
        }
    }
}

/// How busy a listener is: connections in hand against its limit, and
/// whether it is under stress (at least three quarters full). Front ends
/// shorten their idle and read timeouts under stress, the way Postfix's
/// stress-adaptive `smtpd_timeout` does, so that peers holding connections
/// open without progress make room for others within seconds.
#[derive(Debug)]
pub struct Load {
    /// The front end's name, for the connection counters.
    front_end: &'static str,
    /// Its `connections_total` and `connections_active` series, looked up
    /// once (the family's lookup hashes the label at every call).
    accepted: prometheus_client::metrics::counter::Counter,
    in_hand: prometheus_client::metrics::gauge::Gauge,
    max: usize,
    /// The slots of `max`, shared by every listener of the front end (a
    /// limit is the front end's, not each listener's).
    slots: Arc<tokio::sync::Semaphore>,
    active: std::sync::atomic::AtomicUsize,
    stress: tokio::sync::watch::Sender<bool>,
}

impl Load {
    /// The load of front end `front_end`'s listeners, with at most `max`
    /// connections at once on all of them together: make one for the
    /// front end and give it to each listener's [`accept_loop`].
    pub fn new(front_end: &'static str, max: usize) -> Arc<Load> {
        let m = crate::telemetry::host();
        let label = crate::telemetry::FrontEndLabel { front_end };
        Arc::new(Load {
            front_end,
            accepted: m.connections.get_or_create(&label).clone(),
            in_hand: m.connections_active.get_or_create(&label).clone(),
            max: max.max(1),
            slots: Arc::new(tokio::sync::Semaphore::new(max.max(1))),
            active: 0.into(),
            stress: tokio::sync::watch::Sender::new(false),
        })
    }

    pub(crate) fn label(&self) -> crate::telemetry::FrontEndLabel {
        crate::telemetry::FrontEndLabel { front_end: self.front_end }
    }

    /// The most connections at once.
    pub fn max(&self) -> usize {
        self.max
    }

    /// Whether at least three quarters of the slots are taken.
    pub fn stressed(&self) -> bool {
        *self.stress.borrow()
    }

    fn update(&self, delta: isize) {
        use std::sync::atomic::Ordering;
        let n = if delta > 0 {
            self.active.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.active.fetch_sub(1, Ordering::Relaxed).saturating_sub(1)
        };
        self.in_hand.set(i64::try_from(n).unwrap_or(i64::MAX));
        if delta > 0 {
            self.accepted.inc();
        }
        let stressed = n * 4 >= self.max * 3;
        self.stress.send_if_modified(|s| std::mem::replace(s, stressed) != stressed);
    }

    /// Runs `fut` for at most `normal`, or `stressed` while the listener
    /// is under stress (counted from the start, re-checked when the stress
    /// changes, so a wait that began calm is cut short when stress comes).
    /// `None` when the time ran out.
    pub async fn timeout<F: std::future::Future>(&self, normal: Duration, stressed: Duration, fut: F) -> Option<F::Output> {
        let start = tokio::time::Instant::now();
        tokio::pin!(fut);
        // Most waits end at once (a reply the socket buffer takes, a line
        // already in hand): those need no timer and no stress watch, whose
        // registration and removal cost more than the wait itself. Polled
        // with this task's waker, so a pending future is woken as usual.
        if let std::task::Poll::Ready(v) = std::future::poll_fn(|cx| std::task::Poll::Ready(fut.as_mut().poll(cx))).await {
            return Some(v);
        }
        // Until the shorter limit, stress changes nothing: stress that
        // comes meanwhile cuts the wait at that limit, and stress that
        // comes and goes before it does not. So the stress is looked at
        // when it passes, and watched only after (nearly every wait ends
        // before: subscribing to the watch and its wake-ups, at every wait,
        // cost more than the timer).
        let first = stressed.min(normal);
        tokio::select! {
            // The future first: a timer is only armed for a wait.
            biased;
            v = &mut fut => return Some(v),
            _ = tokio::time::sleep_until(start + first) => {}
        }
        if first == normal {
            return None;
        }
        let mut rx = self.stress.subscribe();
        loop {
            // Stress now: its limit has passed.
            if *rx.borrow_and_update() {
                return None;
            }
            tokio::select! {
                biased;
                v = &mut fut => return Some(v),
                _ = tokio::time::sleep_until(start + normal) => return None,
                r = rx.changed() => if r.is_err() {
                    return tokio::time::timeout_at(start + normal, fut).await.ok();
                },
            }
        }
    }
}

/// A connection's place among its front end's `max_connections`: counted
/// in its [`Load`] and holding one of its slots while it lives. The
/// handler [`accept_loop`] gives it to may drop it as soon as the peer is
/// told goodbye (the SMTP front end's `221`), so a peer that reconnects at
/// once finds its place free, whatever cleanup the session still does.
pub struct Admission {
    load: Arc<Load>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Admission {
    /// Serves `served` and gives the place back when it ends: for a front
    /// end whose connections hold their place to the last.
    pub(crate) async fn hold(self, served: impl std::future::Future<Output = ()>) {
        served.await;
        drop(self);
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.load.update(-1);
    }
}

/// What to do with a connection that finds every slot taken.
#[derive(Debug, Clone, Copy)]
pub enum WhenFull {
    /// Leave it in the kernel's backlog until a slot frees (policy,
    /// milter: the MTA waits, and stress timeouts free slots soon).
    Wait,
    /// Accept it, send these bytes (an SMTP `421`) and close it, so a
    /// client hears why instead of waiting in silence.
    Refuse(&'static str),
}

/// Refusals (`421` to a connection past the limit) being written at once,
/// each a short write; past it a connection over the limit is closed
/// without one.
pub(crate) const MAX_REFUSALS: usize = 64;

/// Accepts connections on `listener` until `shutdown` is cancelled, at
/// most `load.max()` at once (on all the listeners that share `load`),
/// each served by `handle(conn, peer, admission)` in its own task (the
/// connection's place is free once the handler has dropped `admission` and,
/// at the latest, when it ends); then waits for the connections in hand to
/// finish (each handler watches `shutdown` itself).
pub async fn accept_loop<F, Fut>(listener: Listener, load: Arc<Load>, when_full: WhenFull, shutdown: CancellationToken, handle: F)
where
    F: Fn(Conn, String, Admission) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let tracker = TaskTracker::new();
    let slots = load.slots.clone();
    let refusals = Arc::new(tokio::sync::Semaphore::new(MAX_REFUSALS));
    let mut failures = AcceptFailures::new(load.front_end);
    loop {
        // Accepted first, then given a slot: the listeners of a front end
        // share its slots, and one waiting for a connection must not hold a
        // slot another listener's peer needs.
        let (mut conn, peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    failures.failed(&e).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let permit = match when_full {
            // The peer waits, as it would in the kernel's backlog; this
            // listener accepts no other meanwhile.
            WhenFull::Wait => tokio::select! {
                p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                _ = shutdown.cancelled() => break,
            },
            WhenFull::Refuse(reply) => match slots.clone().try_acquire_owned() {
                Ok(p) => p,
                Err(_) => {
                    tracing::warn!(%peer, max = load.max(), "connection refused: every slot is taken");
                    crate::telemetry::host().connections_refused.get_or_create(&load.label()).inc();
                    if let Ok(r) = refusals.clone().try_acquire_owned() {
                        tokio::spawn(async move {
                            use tokio::io::AsyncWriteExt;
                            let _ = tokio::time::timeout(Duration::from_secs(2), conn.write_all(reply.as_bytes())).await;
                            drop(r);
                        });
                    }
                    continue;
                }
            },
        };
        load.update(1);
        let admission = Admission { load: load.clone(), _permit: permit };
        // Boxed: a session's future is large (every await point of an SMTP
        // dialogue and its filter calls, ~12 KB), and a task moves its
        // future on spawn, into its cell and out again; a box moves once.
        tracker.spawn(Box::pin(handle(conn, peer, admission)));
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
}

/// How often a listener that keeps failing to accept says so in the log.
const ACCEPT_FAILURE_LOG_EVERY: Duration = Duration::from_secs(10);

/// How long a listener waits after a failed accept before it tries again.
const ACCEPT_FAILURE_BACKOFF: Duration = Duration::from_millis(50);

/// A listener's failed accepts (`EMFILE` when the process is out of file
/// descriptors, `ENFILE`, `ENOBUFS`): each is counted
/// (`greyhook_accept_failures_total`) and followed by a short back-off, so
/// the listener neither spins a core nor floods the log while the shortage
/// lasts; the log says so at most once every
/// [`ACCEPT_FAILURE_LOG_EVERY`], with how many failed since.
pub(crate) struct AcceptFailures {
    listener: &'static str,
    counter: prometheus_client::metrics::counter::Counter,
    last_logged: Option<tokio::time::Instant>,
    unlogged: u64,
}

impl AcceptFailures {
    /// The failures of listener `listener` (a front end's name, `control`
    /// or `metrics`).
    pub(crate) fn new(listener: &'static str) -> AcceptFailures {
        let counter =
            crate::telemetry::host().accept_failures.get_or_create(&crate::telemetry::FrontEndLabel { front_end: listener }).clone();
        AcceptFailures { listener, counter, last_logged: None, unlogged: 0 }
    }

    /// Counts `e`, logs it if the last report is old enough, and waits
    /// [`ACCEPT_FAILURE_BACKOFF`].
    pub(crate) async fn failed(&mut self, e: &std::io::Error) {
        self.counter.inc();
        let now = tokio::time::Instant::now();
        if self.last_logged.is_none_or(|t| now.duration_since(t) >= ACCEPT_FAILURE_LOG_EVERY) {
            let listener = self.listener;
            match self.unlogged {
                0 => tracing::warn!(listener, "accept failed: {e}"),
                n => tracing::warn!(listener, "accept failed: {e} ({n} more since the last report)"),
            }
            self.last_logged = Some(now);
            self.unlogged = 0;
        } else {
            self.unlogged += 1;
        }
        tokio::time::sleep(ACCEPT_FAILURE_BACKOFF).await;
    }
}

/// A file's device and inode.
fn file_id(p: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(p).ok().map(|m| (m.dev(), m.ino()))
}

impl Drop for Listener {
    fn drop(&mut self) {
        // Only the socket we bound: another process may have replaced it.
        if let Listener::Unix(_, p, id) = self
            && id.is_some()
            && file_id(p) == *id
        {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A wait is cut at the stressed limit if the listener is under stress
    /// then, at the normal limit if it stays calm, and at once when stress
    /// comes after the stressed limit has passed; stress that comes and
    /// goes before the stressed limit cuts nothing.
    #[tokio::test(start_paused = true)]
    async fn waits_are_cut_at_the_limit_the_stress_sets() {
        let load = Load::new("test", 4);
        let (normal, stressed) = (Duration::from_secs(300), Duration::from_secs(10));
        let never = || std::future::pending::<()>();
        let timed = |load: Arc<Load>, done_at: Option<u64>| {
            tokio::spawn(async move {
                let start = tokio::time::Instant::now();
                let work = async move {
                    match done_at {
                        Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
                        None => never().await,
                    }
                };
                let r = load.timeout(normal, stressed, work).await;
                (r.is_some(), start.elapsed().as_secs())
            })
        };
        let stress = |load: &Load, on: bool| load.stress.send_replace(on);

        // Calm throughout: the normal limit; work that ends first is done.
        assert_eq!(timed(load.clone(), None).await.unwrap(), (false, 300));
        assert_eq!(timed(load.clone(), Some(299)).await.unwrap(), (true, 299));
        // Under stress from the start: the stressed limit.
        stress(&load, true);
        assert_eq!(timed(load.clone(), None).await.unwrap(), (false, 10));
        assert_eq!(timed(load.clone(), Some(9)).await.unwrap(), (true, 9));
        // Stress that comes before the stressed limit: cut at it.
        stress(&load, false);
        let t = timed(load.clone(), None);
        tokio::time::sleep(Duration::from_secs(4)).await;
        stress(&load, true);
        assert_eq!(t.await.unwrap(), (false, 10));
        // Stress that comes and goes before it: the normal limit.
        stress(&load, false);
        let t = timed(load.clone(), None);
        tokio::time::sleep(Duration::from_secs(4)).await;
        stress(&load, true);
        tokio::time::sleep(Duration::from_secs(2)).await;
        stress(&load, false);
        assert_eq!(t.await.unwrap(), (false, 300));
        // Stress that comes after the stressed limit: cut at once.
        let t = timed(load.clone(), None);
        tokio::time::sleep(Duration::from_secs(100)).await;
        stress(&load, true);
        assert_eq!(t.await.unwrap(), (false, 100));
        // A stressed limit over the normal one: the normal one.
        stress(&load, true);
        let r = load.timeout(Duration::from_secs(5), Duration::from_secs(50), never()).await;
        assert!(r.is_none());
    }

    /// What `bind` sets on a TCP listener, every accepted connection has
    /// without a system call of its own (Linux copies the listener's
    /// options into the connections it accepts).
    #[tokio::test]
    async fn accepted_connections_inherit_nodelay_and_the_send_buffer() {
        let l = Listener::bind(&ListenAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 0))), &UnixPerms::default()).await.unwrap();
        let Listener::Tcp(t) = &l else { panic!("a TCP listener") };
        let _client = std::net::TcpStream::connect(t.local_addr().unwrap()).unwrap();
        let (s, _) = t.accept().await.unwrap();
        let sock = socket2::SockRef::from(&s);
        assert!(sock.tcp_nodelay().unwrap(), "TCP_NODELAY inherited");
        // The kernel doubles what was asked (bookkeeping); far below its default.
        assert!(sock.send_buffer_size().unwrap() <= 2 * PEER_SEND_BUFFER, "{}", sock.send_buffer_size().unwrap());
    }
}
