//! Relaying between two async streams (a terminated TLS session and its
//! backend or service), both ways until both sides are done, ending at the
//! idle timeout when neither side moves.

use std::cell::Cell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// How a stream relay ended.
#[derive(Debug)]
pub enum Ended {
    /// Both sides finished: bytes client → other, other → client.
    Done(u64, u64),
    /// Neither side moved for the idle timeout.
    Idle,
    Failed(io::Error),
}

/// Relays `a` ↔ `b`; an end of file on one side shuts down the other's
/// writing half (a TLS close_notify), and the other direction carries on.
pub async fn relay<A, B>(a: A, b: B, idle: Duration) -> Ended
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let last = Rc::new(Cell::new(Instant::now()));
    let mut a = Watched { inner: a, last: last.clone() };
    let mut b = Watched { inner: b, last: last.clone() };
    // A TLS record carries at most 16 KiB: larger buffers would only cost memory per connection.
    let copy = tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, 16 * 1024, 16 * 1024);
    tokio::pin!(copy);
    loop {
        let deadline = last.get() + idle;
        tokio::select! {
            r = &mut copy => return match r {
                Ok((up, down)) => Ended::Done(up, down),
                Err(e) => Ended::Failed(e),
            },
            () = tokio::time::sleep_until(deadline) => {
                if last.get() + idle <= Instant::now() {
                    return Ended::Idle;
                }
            }
        }
    }
}

/// A stream that notes when bytes last moved through it.
struct Watched<T> {
    inner: T,
    last: Rc<Cell<Instant>>,
}

impl<T> Watched<T> {
    fn moved<R>(&self, p: &Poll<io::Result<R>>) {
        if matches!(p, Poll::Ready(Ok(_))) {
            self.last.set(Instant::now());
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let p = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.moved(&p);
        p
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let p = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.moved(&p);
        p
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
