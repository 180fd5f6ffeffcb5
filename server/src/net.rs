//! Byte counting on the socket: every accepted connection is wrapped in a [`CountingStream`], so the bytes
//! the coordinator reads and writes — TLS records, HTTP/2 frames and all — are counted below TLS. The
//! counters travel to the gRPC handlers as connection info, where they are attributed to the client that
//! authenticated on the connection.
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::Stream;
use tonic::transport::server::Connected;

/// Bytes read from and written to one connection.
#[derive(Debug, Default)]
pub struct Counters {
    read: AtomicU64,
    written: AtomicU64,
}

impl Counters {
    /// Bytes read so far (client → coordinator).
    pub fn read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    /// Bytes written so far (coordinator → client).
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }
}

/// A stream that counts the bytes passing through it.
pub struct CountingStream<T> {
    inner: T,
    counters: Arc<Counters>,
    remote: Option<SocketAddr>,
}

/// What a handler learns about its connection.
#[derive(Clone, Debug)]
pub struct ConnInfo {
    /// The connection's byte counters.
    pub counters: Arc<Counters>,
    /// The peer's address.
    pub remote: Option<SocketAddr>,
}

impl<T: AsyncRead + Unpin> AsyncRead for CountingStream<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.counters.read.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CountingStream<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.counters.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &r {
            self.counters.written.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl Connected for CountingStream<TcpStream> {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        ConnInfo { counters: self.counters.clone(), remote: self.remote }
    }
}

/// Accepted connections of `listener`, each wrapped in a [`CountingStream`] (with TCP_NODELAY).
pub fn counting_incoming(listener: TcpListener) -> impl Stream<Item = io::Result<CountingStream<TcpStream>>> {
    accept_loop(listener)
}

fn accept_loop(listener: TcpListener) -> impl Stream<Item = io::Result<CountingStream<TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let r = listener.accept().await.map(|(s, remote)| {
                let _ = s.set_nodelay(true);
                CountingStream { inner: s, counters: Arc::new(Counters::default()), remote: Some(remote) }
            });
            if tx.send(r).await.is_err() {
                break;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_stream::StreamExt;

    #[tokio::test]
    async fn counts_both_directions() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = Box::pin(counting_incoming(listener));
        let client = tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            c.write_all(&[7u8; 1000]).await.unwrap();
            let mut buf = [0u8; 10];
            c.read_exact(&mut buf).await.unwrap();
        });
        let mut s = incoming.next().await.unwrap().unwrap();
        let info = s.connect_info();
        let mut buf = vec![0u8; 1000];
        s.read_exact(&mut buf).await.unwrap();
        s.write_all(&[1u8; 10]).await.unwrap();
        client.await.unwrap();
        assert_eq!(info.counters.read(), 1000);
        assert_eq!(info.counters.written(), 10);
    }
}
