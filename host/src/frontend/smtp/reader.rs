//! The client connection's read side, buffered for
//! [`super::wire::read_line`].

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncBufRead, AsyncRead};

/// How much [`ClientReader`] reads from the client at a time.
pub const READ_BUFFER: usize = 8 << 10;

/// The client connection, buffered for [`super::wire::read_line`]: what tokio's
/// `BufReader` does, without zero-filling its buffer. `BufReader` zeroes
/// its 8 KiB for every connection (a `calloc`: ~8 700 instructions, about
/// 5% of what a one-message session costs `greyhook smtp`); this reads
/// into the spare capacity of a `BytesMut` instead, which `poll_read_buf`
/// hands to the socket uninitialised.
pub struct ClientReader<R> {
    inner: R,
    buf: BytesMut,
}

impl<R> ClientReader<R> {
    /// Buffers `inner` ([`READ_BUFFER`] at a time).
    pub fn new(inner: R) -> ClientReader<R> {
        ClientReader { inner, buf: BytesMut::with_capacity(READ_BUFFER) }
    }

    /// The connection, to write to.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// What has been read and not consumed.
    pub fn buffer(&self) -> &[u8] {
        &self.buf
    }

    /// Drops the first `n` bytes of what has been read.
    pub fn skip(&mut self, n: usize) {
        self.buf.advance(n.min(self.buf.len()));
    }

    /// Reads what the connection has now after what is buffered: the
    /// number of bytes read, 0 at the stream's end. The buffer grows if it
    /// is full; the caller bounds how far.
    pub async fn read_more(&mut self) -> std::io::Result<usize>
    where
        R: AsyncRead + Unpin,
    {
        self.buf.reserve(READ_BUFFER.saturating_sub(self.buf.len()).max(1));
        tokio::io::AsyncReadExt::read_buf(&mut self.inner, &mut self.buf).await
    }

    /// The connection; what was buffered is dropped.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for ClientReader<R> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut tokio::io::ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        if me.buf.is_empty() {
            return Pin::new(&mut me.inner).poll_read(cx, out);
        }
        let n = me.buf.len().min(out.remaining());
        out.put_slice(&me.buf[..n]);
        me.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<R: AsyncRead + Unpin> AsyncBufRead for ClientReader<R> {
    fn poll_fill_buf(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<&[u8]>> {
        let me = self.get_mut();
        if me.buf.is_empty() {
            // Empty: `reserve` takes the allocation back from its start
            // instead of growing it.
            me.buf.reserve(READ_BUFFER);
            ready!(tokio_util::io::poll_read_buf(Pin::new(&mut me.inner), cx, &mut me.buf))?;
        }
        Poll::Ready(Ok(&me.buf[..]))
    }

    fn consume(self: Pin<&mut Self>, amt: usize) {
        let me = self.get_mut();
        me.buf.advance(amt.min(me.buf.len()));
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::frontend::smtp::wire::{Line, read_line};

    /// Lines that arrive split across reads come out whole, a line past the
    /// limit is dropped whole, the stream's end is seen, and the buffer is
    /// reused: it never grows past [`READ_BUFFER`].
    #[tokio::test]
    async fn lines_across_reads_in_a_buffer_that_never_grows() {
        let (mut client, server) = tokio::io::duplex(61);
        let mut r = ClientReader::new(server);
        let writer = tokio::spawn(async move {
            for _ in 0..2000 {
                client.write_all(b"EHLO client.example.org\r\nMAIL FROM:<a@example.org>\r\n").await.unwrap();
            }
            client.write_all(&[b'x'; 20_000]).await.unwrap();
            client.write_all(b"\r\nQUIT\r\n").await.unwrap();
        });
        let line = |s: &'static str| Some(Line::Text(s.as_bytes()));
        let mut buf = Vec::new();
        for _ in 0..2000 {
            assert_eq!(read_line(&mut r, 512, &mut buf).await.unwrap(), line("EHLO client.example.org\r\n"));
            assert_eq!(read_line(&mut r, 512, &mut buf).await.unwrap(), line("MAIL FROM:<a@example.org>\r\n"));
            assert!(r.buf.capacity() <= READ_BUFFER, "{}", r.buf.capacity());
        }
        assert_eq!(read_line(&mut r, 512, &mut buf).await.unwrap(), Some(Line::TooLong));
        assert_eq!(read_line(&mut r, 512, &mut buf).await.unwrap(), line("QUIT\r\n"));
        writer.await.unwrap();
        assert_eq!(read_line(&mut r, 512, &mut buf).await.unwrap(), None);
        assert!(r.buffer().is_empty());
    }
}
