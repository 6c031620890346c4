//! A socket's read-ahead buffer, allocated only while data flows.
//!
//! tungstenite reads at most its read buffer's capacity per call, and holds
//! that buffer for the connection's whole life. A large one costs every idle
//! connection its size; a small one costs a syscall per few frames under
//! load (a 4 KiB buffer took ~20 % more relay CPU per message than a 16 KiB
//! one, see BENCHMARKS.md). [`ReadAhead`] sits between the two: it reads up
//! to `capacity` bytes per syscall into a buffer it allocates when a read
//! needs one and gives up as soon as everything in it was handed on, so an
//! idle connection holds none of it, and tungstenite's own buffer can stay
//! small. A buffer given up waits in a one-buffer cache per thread for the
//! next socket that reads: a read attempt that finds nothing (most of them,
//! for a busy connection's task) costs no allocation.

use std::cell::Cell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// See the module docs. Writes pass straight through.
pub struct ReadAhead<S> {
    /// The socket.
    inner: S,
    /// Bytes read from the socket and not yet handed on. Empty with no
    /// allocation whenever it has nothing to hand on.
    buffered: BytesMut,
    /// Most bytes read from the socket per syscall.
    capacity: usize,
}

impl<S> ReadAhead<S> {
    pub fn new(inner: S, capacity: usize) -> Self {
        ReadAhead {
            inner,
            buffered: BytesMut::new(),
            capacity,
        }
    }

    fn acquire(&mut self) {
        if self.buffered.capacity() == 0 {
            self.buffered = SPARE.with(Cell::take).unwrap_or_default();
        }
        // Reclaims the cached buffer's whole allocation (nothing else
        // refers to it) or allocates one.
        self.buffered.reserve(self.capacity);
    }

    fn release(&mut self) {
        let mut buffer = std::mem::take(&mut self.buffered);
        buffer.clear();
        // Replacing an older spare frees it: one buffer per thread at most.
        SPARE.with(|spare| spare.set(Some(buffer)));
    }
}

thread_local! {
    /// An empty read buffer given up by a socket on this thread, for the
    /// next one that reads.
    static SPARE: Cell<Option<BytesMut>> = const { Cell::new(None) };
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.buffered.is_empty() {
            // A reader asking for as much as we would read gains nothing
            // from the extra copy.
            if out.remaining() >= this.capacity {
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            this.acquire();
            let read =
                tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.buffered);
            match read {
                Poll::Ready(Ok(n)) if n > 0 => {}
                // Nothing to read yet, an error, or the end of the stream
                // (which `out` says by staying empty). Waiting holds no
                // buffer: most sockets wait most of the time.
                read => {
                    this.release();
                    return read.map_ok(|_| ());
                }
            }
        }
        let n = out.remaining().min(this.buffered.len());
        out.put_slice(&this.buffered[..n]);
        this.buffered.advance(n);
        if this.buffered.is_empty() {
            this.release();
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn hands_on_everything_in_order_in_small_reads_and_holds_nothing_when_drained() {
        let (mut writer, reader) = tokio::io::duplex(64 * 1024);
        let sent: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        writer.write_all(&sent).await.unwrap();
        drop(writer);
        let mut ahead = ReadAhead::new(reader, 8 * 1024);
        let mut got = Vec::new();
        let mut chunk = [0u8; 1000];
        loop {
            let n = ahead.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            assert!(n <= chunk.len());
            got.extend_from_slice(&chunk[..n]);
            if ahead.buffered.is_empty() {
                assert_eq!(ahead.buffered.capacity(), 0, "a drained buffer is freed");
            }
        }
        assert_eq!(got, sent);
        assert_eq!(ahead.buffered.capacity(), 0);
        let spare = SPARE
            .with(Cell::take)
            .expect("the drained buffer is kept for reuse");
        assert!(spare.is_empty());
    }

    #[tokio::test]
    async fn waiting_holds_no_buffer() {
        let (mut writer, reader) = tokio::io::duplex(1024);
        let mut ahead = ReadAhead::new(reader, 8 * 1024);
        let mut chunk = [0u8; 100];
        let waiting = futures::FutureExt::now_or_never(ahead.read(&mut chunk));
        assert!(waiting.is_none(), "nothing was written yet");
        assert_eq!(ahead.buffered.capacity(), 0);
        writer.write_all(b"hello").await.unwrap();
        assert_eq!(ahead.read(&mut chunk).await.unwrap(), 5);
        assert_eq!(&chunk[..5], b"hello");
        assert_eq!(ahead.buffered.capacity(), 0);
    }

    #[tokio::test]
    async fn large_reads_bypass_the_buffer() {
        let (mut writer, reader) = tokio::io::duplex(64 * 1024);
        writer.write_all(&[7u8; 5000]).await.unwrap();
        let mut ahead = ReadAhead::new(reader, 1024);
        let mut big = vec![0u8; 4096];
        let n = ahead.read(&mut big).await.unwrap();
        assert!(n > 1024, "read {n} bytes straight into the caller's buffer");
        assert_eq!(ahead.buffered.capacity(), 0);
    }
}
