//! Bodies that pass through the engine: a request body with the size limit
//! counted as it streams, and a response body that gives its backend
//! connection back to the pool once it ends.

use super::pool::Lease;
use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use std::pin::Pin;
use std::task::{Context, Poll};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A request body was longer than `--max-request-body`.
#[derive(Debug, thiserror::Error)]
#[error("the request body is longer than {0} bytes (--max-request-body)")]
pub struct TooLarge(pub u64);

/// A client's request body on its way to the target.
#[derive(Debug)]
pub struct ReqBody {
    inner: Option<Incoming>,
    left: u64,
    limit: u64,
}

impl ReqBody {
    pub fn new(inner: Incoming, limit: u64) -> ReqBody {
        ReqBody { inner: Some(inner), left: limit, limit }
    }

    pub fn empty() -> ReqBody {
        ReqBody { inner: None, left: 0, limit: 0 }
    }
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Some(inner) = self.inner.as_mut() else { return Poll::Ready(None) };
        match std::task::ready!(Pin::new(inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if n > self.left {
                        self.inner = None;
                        return Poll::Ready(Some(Err(Box::new(TooLarge(self.limit)))));
                    }
                    self.left -= n;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => Poll::Ready(Some(Err(Box::new(e)))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

/// A response on its way to the client.
#[derive(Debug)]
pub enum RespBody {
    /// Written by portmux.
    Full(Option<Bytes>),
    /// The target's, with the connection it came on (back to the pool at its end).
    Target { inner: Incoming, lease: Option<Lease> },
}

impl RespBody {
    pub fn full(text: impl Into<Bytes>) -> RespBody {
        RespBody::Full(Some(text.into()))
    }

    pub fn empty() -> RespBody {
        RespBody::Full(None)
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RespBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            RespBody::Target { inner, lease } => match std::task::ready!(Pin::new(&mut *inner).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if inner.is_end_stream()
                        && let Some(lease) = lease.take()
                    {
                        lease.release();
                    }
                    Poll::Ready(Some(Ok(frame)))
                }
                Some(Err(e)) => {
                    lease.take();
                    Poll::Ready(Some(Err(Box::new(e))))
                }
                None => {
                    if let Some(lease) = lease.take() {
                        lease.release();
                    }
                    Poll::Ready(None)
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::Full(b) => b.is_none(),
            RespBody::Target { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            RespBody::Target { inner, .. } => inner.size_hint(),
        }
    }
}
