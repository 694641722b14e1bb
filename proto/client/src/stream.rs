//! A connection portmux handed over, in the blocking flavour: a `TcpStream`
//! (everything of it through `Deref`) that its listener counts until it is
//! dropped, and that goes back to portmux, instead of closing, when a graceful
//! shutdown ends it between requests.

use crate::handle::Tracked;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::time::Duration;

/// A handed-over connection. Read and write it like the `TcpStream` it
/// derefs to. While its listener shuts down gracefully
/// ([`crate::Listener::shutdown`]), a read that would wait for a next request
/// returns end-of-file, and dropping the stream then gives it back to portmux
/// (which holds it for the next instance) instead of closing it: a keep-alive
/// client never notices the restart.
#[derive(Debug)]
pub struct Stream {
    inner: Option<TcpStream>,
    tracked: Tracked,
}

impl Stream {
    pub(crate) fn new(inner: TcpStream, tracked: Tracked) -> Stream {
        Stream { inner: Some(inner), tracked }
    }

    fn tcp(&self) -> &TcpStream {
        self.inner.as_ref().expect("present until into_inner")
    }

    /// Whether the connection sits between requests, so it could go back to
    /// portmux: plain HTTP/1 whose every request read had its final response
    /// written in full (the library follows their framing), nothing of a
    /// next request read, and no side asked to close or switched protocols.
    pub fn between_requests(&self) -> bool {
        self.tracked.between_requests()
    }

    /// The `TcpStream`, no longer counted or given back by the listener.
    pub fn into_inner(mut self) -> TcpStream {
        self.inner.take().expect("present until into_inner")
    }

    pub(crate) fn tracked(&self) -> &Tracked {
        &self.tracked
    }

    /// Waits until the socket is readable, the read timeout passes, or a
    /// graceful shutdown begins (then `Ok(false)`).
    fn wait_readable(&self) -> io::Result<bool> {
        use rustix::event::{PollFd, PollFlags, Timespec, poll};
        let sock = self.tcp();
        let blocking = !rustix::fs::fcntl_getfl(sock).map_err(io::Error::from)?.contains(rustix::fs::OFlags::NONBLOCK);
        if !blocking {
            return Ok(true); // The caller asked not to wait.
        }
        let timeout = sock
            .read_timeout()?
            .map(|d: Duration| Timespec { tv_sec: d.as_secs() as _, tv_nsec: d.subsec_nanos() as _ });
        loop {
            if self.tracked.ends_here() {
                return Ok(false);
            }
            // Once the shutdown began, its wake-up stays readable: only the
            // socket is watched then (this read does not end here).
            let wake = self.tracked.handle.wake_fd();
            let mut fds = [PollFd::new(sock, PollFlags::IN), PollFd::new(&wake, PollFlags::IN)];
            let watched = if self.tracked.handle.is_closing() { 1 } else { 2 };
            match poll(&mut fds[..watched], timeout.as_ref()) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::WouldBlock, "read timed out")),
                Ok(_) if fds[0].revents().is_empty() => continue, // the shutdown's wake-up
                Ok(_) => return Ok(true),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.tracked.can_go_back() && !self.wait_readable()? {
            return Ok(0);
        }
        let n = (&mut self.tcp()).read(buf)?;
        self.tracked.read(&buf[..n]);
        Ok(n)
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = (&mut self.tcp()).write(buf)?;
        self.tracked.wrote(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        (&mut self.tcp()).flush()
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        (&*self).flush()
    }
}

impl std::ops::Deref for Stream {
    type Target = TcpStream;

    fn deref(&self) -> &TcpStream {
        self.tcp()
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.tcp().as_fd()
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        self.tcp().as_raw_fd()
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if let Some(inner) = &self.inner {
            self.tracked.finish(inner.as_fd());
        }
    }
}
