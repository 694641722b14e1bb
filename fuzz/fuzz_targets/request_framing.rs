//! The per-request engine's framing guard (`l7::guard`): whatever a client
//! sends, in whatever pieces, what hyper is given is a prefix of it.
#![no_main]
use libfuzzer_sys::fuzz_target;
use portmux::l7::guard::{Control, Guarded};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncRead, ReadBuf};

/// Hands out its bytes at most `step` at a time.
struct Pieces<'a> {
    data: &'a [u8],
    step: usize,
}

impl AsyncRead for Pieces<'_> {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let n = self.step.min(self.data.len()).min(buf.remaining());
        buf.put_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Poll::Ready(Ok(()))
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, input)) = data.split_first() else { return };
    let step = usize::from(first % 64) + 1;
    let ctl = Rc::new(Control::default());
    let mut guarded = Guarded::new(Pieces { data: input, step }, Vec::new(), 1024, ctl.clone());
    let mut cx = Context::from_waker(Waker::noop());
    let mut out = Vec::new();
    for _ in 0..input.len() + 2 {
        let mut buf = [0u8; 97];
        let mut rb = ReadBuf::new(&mut buf);
        match Pin::new(&mut guarded).poll_read(&mut cx, &mut rb) {
            Poll::Ready(Ok(())) if !rb.filled().is_empty() => out.extend_from_slice(rb.filled()),
            _ => break,
        }
        if first & 0x80 != 0 {
            // Now and then an upgrade's answer, as the engine would give it.
            ctl.decide_upgrade(first & 0x40 != 0);
        }
    }
    assert!(input.starts_with(&out), "only the client's own bytes, in order");
});
