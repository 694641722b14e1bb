//! systemd integration: readiness, reload and status notifications (the
//! sd_notify protocol, spoken directly on `$NOTIFY_SOCKET`).

use std::os::unix::net::UnixDatagram;

/// Sends `lines` to systemd, if portmux runs under it. Returns whether it was sent.
pub fn notify(lines: &[&str]) -> bool {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return false };
    let Ok(sock) = UnixDatagram::unbound() else { return false };
    let text = lines.join("\n");
    let bytes = path.as_encoded_bytes();
    let sent = match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name)
                .and_then(|addr| sock.send_to_addr(text.as_bytes(), &addr))
        }
        None => sock.send_to(text.as_bytes(), &path),
    };
    sent.is_ok()
}

/// Tells systemd a reload (upgrade) began, as `Type=notify-reload` expects.
pub fn reloading() {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    let usec = now.tv_sec as u64 * 1_000_000 + now.tv_nsec as u64 / 1000;
    notify(&["RELOADING=1", &format!("MONOTONIC_USEC={usec}"), "STATUS=upgrading"]);
}
