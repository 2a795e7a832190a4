//! The PROXY protocol (HAProxy's, versions 1 and 2) at the start of a
//! connection, for `greyhook smtp` behind a TCP load balancer: the balancer
//! connects to greyhook and first sends a header naming the real client,
//! which greylisting, the per-client limits, the `Received:` line and
//! XFORWARD then use (Postfix: `smtpd_upstream_proxy_protocol = haproxy`).
//!
//! The `ppp` crate parses the header; this module bounds what is read for
//! it ([`MAX_HEADER`]) and leaves whatever follows it in the reader, as
//! the client's first bytes.

use tokio::io::AsyncRead;

use super::reader::ClientReader;

/// The longest header taken. A version 1 header is at most 107 bytes; a
/// version 2 header may carry up to 64 KiB of extensions, but HAProxy's
/// (addresses, TLS details, a unique ID) stay well under this.
pub const MAX_HEADER: usize = 4096;

/// Why a connection had no usable header.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The peer closed the connection first (a balancer's connect-only
    /// health check does that).
    #[error("the connection closed before a PROXY header")]
    Closed,
    /// What came is no PROXY header.
    #[error("no valid PROXY header: {0}")]
    Malformed(String),
    /// More than [`MAX_HEADER`] bytes without a complete header.
    #[error("PROXY header longer than {MAX_HEADER} bytes")]
    TooLong,
    /// Reading failed.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl ProxyError {
    /// The `reason` label of `proxy_refusals_total` for it.
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::Closed | ProxyError::Io(_) => "closed",
            ProxyError::Malformed(_) | ProxyError::TooLong => "malformed",
        }
    }
}

/// Whom the header names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The client the balancer relays.
    Client(std::net::SocketAddr),
    /// Nobody else: the balancer speaks for itself (version 2 `LOCAL`,
    /// version 1 `UNKNOWN`, or addresses that are not IP: a health check),
    /// so the connection's own peer is the client.
    Proxy,
}

/// Reads the header at the start of `r` and consumes it; whatever came
/// after it stays in `r`. Waits as long as the header is incomplete: the
/// caller bounds the time.
pub async fn read_header<R: AsyncRead + Unpin>(r: &mut ClientReader<R>) -> Result<Source, ProxyError> {
    use ppp::PartialResult;
    use std::net::SocketAddr;
    loop {
        let parsed = ppp::HeaderResult::parse(r.buffer());
        if !parsed.is_incomplete() {
            let (len, source) = match parsed {
                ppp::HeaderResult::V1(Ok(h)) => (
                    h.header.len(),
                    match h.addresses {
                        ppp::v1::Addresses::Tcp4(a) => Source::Client(SocketAddr::from((a.source_address, a.source_port))),
                        ppp::v1::Addresses::Tcp6(a) => Source::Client(SocketAddr::from((a.source_address, a.source_port))),
                        ppp::v1::Addresses::Unknown => Source::Proxy,
                    },
                ),
                ppp::HeaderResult::V2(Ok(h)) => (
                    h.len(),
                    match (h.command, h.addresses) {
                        (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv4(a)) => {
                            Source::Client(SocketAddr::from((a.source_address, a.source_port)))
                        }
                        (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv6(a)) => {
                            Source::Client(SocketAddr::from((a.source_address, a.source_port)))
                        }
                        _ => Source::Proxy,
                    },
                ),
                ppp::HeaderResult::V1(Err(e)) => return Err(ProxyError::Malformed(e.to_string())),
                ppp::HeaderResult::V2(Err(e)) => return Err(ProxyError::Malformed(e.to_string())),
            };
            if len > MAX_HEADER {
                return Err(ProxyError::TooLong);
            }
            r.skip(len);
            return Ok(source);
        }
        if r.buffer().len() >= MAX_HEADER {
            return Err(ProxyError::TooLong);
        }
        if r.read_more().await? == 0 {
            return Err(ProxyError::Closed);
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    async fn parse(bytes: &[u8], split: usize) -> (Result<Source, ProxyError>, Vec<u8>) {
        let (mut client, server) = tokio::io::duplex(64);
        let bytes = bytes.to_vec();
        // The writer stops at a write error: the reader gone after a refusal.
        let writer = tokio::spawn(async move {
            let (first, rest) = bytes.split_at(split.min(bytes.len()));
            if client.write_all(first).await.is_ok() {
                tokio::task::yield_now().await;
                let _ = client.write_all(rest).await;
            }
        });
        let mut r = ClientReader::new(server);
        let got = read_header(&mut r).await;
        let rest = r.buffer().to_vec();
        drop(r);
        writer.await.unwrap();
        (got, rest)
    }

    /// Version 1 and 2 headers, whole or split across reads, name the
    /// client; what follows them is left for the SMTP dialogue.
    #[tokio::test]
    async fn headers_name_the_client_and_leave_what_follows() {
        let v1 = b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\nEHLO x\r\n";
        for split in [0, 3, 20, v1.len()] {
            let (s, rest) = parse(v1, split).await;
            assert_eq!(s.unwrap(), Source::Client("192.0.2.7:40000".parse().unwrap()), "split at {split}");
            assert_eq!(rest, b"EHLO x\r\n");
        }
        let (s, _) = parse(b"PROXY TCP6 2001:db8::9 ::1 40000 25\r\n", 7).await;
        assert_eq!(s.unwrap(), Source::Client("[2001:db8::9]:40000".parse().unwrap()));
        let (s, rest) = parse(b"PROXY UNKNOWN\r\nQUIT\r\n", 100).await;
        assert_eq!((s.unwrap(), rest.as_slice()), (Source::Proxy, &b"QUIT\r\n"[..]));

        let mut v2 = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        v2.extend([0x21, 0x11, 0, 12, 198, 51, 100, 7, 127, 0, 0, 1, 0x9c, 0x40, 0, 25]);
        v2.extend(b"EHLO y\r\n");
        for split in [5, 14, 20] {
            let (s, rest) = parse(&v2, split).await;
            assert_eq!(s.unwrap(), Source::Client("198.51.100.7:40000".parse().unwrap()), "split at {split}");
            assert_eq!(rest, b"EHLO y\r\n");
        }
        let mut local = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        local.extend([0x20, 0x00, 0, 0]);
        assert_eq!(parse(&local, 3).await.0.unwrap(), Source::Proxy);
    }

    /// Anything else is refused: a client speaking SMTP at once, a v1
    /// line too long, a v2 header past [`MAX_HEADER`], a close midway.
    #[tokio::test]
    async fn anything_else_is_refused() {
        assert!(matches!(parse(b"EHLO client\r\n", 100).await.0, Err(ProxyError::Malformed(_))));
        assert!(matches!(parse(b"PROXY TCP4 999.0.2.7 127.0.0.1 1 25\r\n", 100).await.0, Err(ProxyError::Malformed(_))));
        assert!(matches!(parse(&[b'P'; 2][..], 100).await.0, Err(ProxyError::Malformed(_))));
        let long = format!("PROXY TCP4 {}\r\n", "1".repeat(200));
        assert!(matches!(parse(long.as_bytes(), 100).await.0, Err(ProxyError::Malformed(_))));
        let mut big = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        big.extend([0x21, 0x11, 0x20, 0x00]);
        big.extend(vec![0u8; 0x2000]);
        assert!(matches!(parse(&big, 100).await.0, Err(ProxyError::TooLong)));
        assert!(matches!(parse(b"PROXY TCP4 192.0", 100).await.0, Err(ProxyError::Closed)));
    }
}
