//! A service built on this library meeting an older portmux, one that
//! speaks only protocol version 1 (releases before Acks): the library opens
//! the session again in version 1 and acks connections one by one, as that
//! portmux expects. The portmux side here answers byte for byte what such a
//! release answers.

use portmux_sys::net;
use portmux_sys::scm::{self, Wait};
use portmux_wire::{Bound, ConnMeta, Message, Proto};
use rustix::event::{PollFd, PollFlags, Timespec, poll};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};

fn wait_readable(fd: impl AsFd) {
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    let n = poll(&mut fds, Some(&Timespec { tv_sec: 10, tv_nsec: 0 })).unwrap();
    assert_eq!(n, 1, "nothing came within 10 s");
}

fn accept(listener: &OwnedFd) -> OwnedFd {
    loop {
        wait_readable(listener);
        if let Some((fd, _)) = net::seqpacket_accept(listener.as_fd()).unwrap() {
            return fd;
        }
    }
}

fn recv(sock: &OwnedFd) -> Message {
    let mut buf = vec![0u8; portmux_wire::MAX_MESSAGE];
    wait_readable(sock);
    let dg = scm::recv_with_fds(sock, &mut buf, Wait::DontWait).unwrap();
    portmux_wire::decode(&buf[..dg.len]).unwrap()
}

fn send(sock: &OwnedFd, msg: &Message) {
    scm::send_datagram(sock.as_fd(), &portmux_wire::encode(msg).unwrap(), Wait::Block).unwrap();
}

#[test]
fn against_a_version_1_portmux_the_session_opens_in_version_1_and_acks_one_by_one() {
    let dir = std::env::temp_dir().join(format!("portmux-older-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("control.sock");
    let control = net::seqpacket_listener(&path).unwrap();
    let public = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = public.local_addr().unwrap();
    let old = std::thread::spawn(move || {
        // Each newer version is refused in turn, with the words such a release uses.
        for version in (2..=portmux_wire::PROTOCOL_VERSION).rev() {
            let s = accept(&control);
            assert_eq!(recv(&s), Message::Hello { version, service: "old".into() });
            let reason = format!(
                "protocol version {version} is not supported: this portmux speaks version 1; use a client library \
                 of the same release"
            );
            send(&s, &Message::Error { reason });
            // As portmux does: it lingers, reading, until the service has read
            // why and closed (closing under its Register would reset it first).
            let mut buf = vec![0u8; portmux_wire::MAX_MESSAGE];
            loop {
                wait_readable(&s);
                match scm::recv_with_fds(&s, &mut buf, Wait::DontWait) {
                    Ok(dg) if dg.len > 0 => {}
                    _ => break,
                }
            }
            drop(s);
        }
        // Version 1 is served.
        let s = accept(&control);
        assert_eq!(recv(&s), Message::Hello { version: 1, service: "old".into() });
        let Message::Register { routes } = recv(&s) else { panic!("expected Register") };
        send(&s, &Message::Registered { routes: vec![Bound { route: routes[0].clone(), listen: addr }] });
        // Two connections at once; each comes back acked on its own.
        let clients: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(addr).unwrap()).collect();
        for id in [7, 8] {
            let (conn, peer) = public.accept().unwrap();
            let meta = ConnMeta {
                route: routes[0].clone(),
                proto: Proto::Tcp,
                peer,
                local: addr,
                sni: None,
                alpn: vec![],
                host: None,
                path: None,
                peeked: 0,
            };
            let bytes = portmux_wire::encode(&Message::Connection { id, meta }).unwrap();
            scm::send_with_fds(s.as_fd(), &bytes, &[conn.as_fd()], Wait::Block).unwrap();
        }
        assert_eq!([recv(&s), recv(&s)], [Message::Ack { id: 7 }, Message::Ack { id: 8 }]);
        (s, clients)
    });
    let listener = portmux_client::Builder::new().route("tcp://:9").name("old").control(&path).bind().unwrap();
    let (_, first) = listener.accept().unwrap();
    let (_, second) = listener.accept().unwrap();
    assert_eq!((first.id, second.id), (7, 8));
    let _still_open = old.join().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
