//! Acks: a service takes the connections waiting in its session socket at
//! once and acks them in one message (protocol version 2); a version-1
//! service acks them one by one. Either way portmux closes its copy of each,
//! so a client sees the service's close as soon as the service closes.

use crate::util::*;
use portmux_wire::Message;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::OwnedFd;
use std::time::Duration;

const WAITING: usize = 12;

/// Opens `n` clients of `port` and waits until portmux has handed every one
/// of them to the service behind `route`: they wait in its session socket.
fn queue_clients(pm: &Portmux, route: &str, port: u16, n: usize) -> Vec<TcpStream> {
    let clients: Vec<TcpStream> = (0..n).map(|_| client(port)).collect();
    let handed = |pm: &Portmux| pm.route(route).and_then(|r| r.counts).map_or(0, |c| c.handed_off);
    pm.wait_for(&format!("{n} connections handed off"), |pm| handed(pm) == n as u64);
    clients
}

/// Each client reads what the service wrote, then end-of-file: the service
/// closed its end, and portmux holds no copy (else no FIN would come).
fn each_sees_its_answer_and_the_close(clients: Vec<TcpStream>) {
    let answered = clients.len();
    let mut seen = Vec::new();
    for mut c in clients {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let got = read_until_close(&mut c).unwrap_or_else(|e| panic!("no close from the service ({e:?})"));
        seen.push(String::from_utf8(got).unwrap());
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), answered, "every client got its own answer: {seen:?}");
}

#[test]
fn a_blocking_service_takes_the_waiting_connections_together_and_acks_them_all() {
    let pm = Portmux::start(&[]);
    let port = free_port();
    let route = format!("tcp://:{port}");
    let listener = portmux_client::Builder::new().route(&route).control(pm.control()).bind().unwrap();
    let clients = queue_clients(&pm, &route, port, WAITING);
    for _ in 0..WAITING {
        let (mut stream, info) = listener.accept().unwrap();
        write!(stream, "connection {}", info.id).unwrap();
    }
    each_sees_its_answer_and_the_close(clients);
    // The session goes on: the next connection comes on its own.
    let late = client(port);
    let (mut stream, info) = listener.accept().unwrap();
    write!(stream, "late {}", info.id).unwrap();
    drop(stream);
    each_sees_its_answer_and_the_close(vec![late]);
}

#[test]
fn an_event_loop_that_takes_one_connection_per_wake_still_gets_every_waiting_one() {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let pm = Portmux::start(&[]);
    let port = free_port();
    let route = format!("tcp://:{port}");
    let listener = portmux_client::Builder::new().route(&route).control(pm.control()).bind().unwrap();
    let wake = listener.poll_fd().unwrap();
    let clients = queue_clients(&pm, &route, port, WAITING);
    let mut taken = 0;
    while taken < WAITING {
        // One try_accept per wake (the contract asks for more, a careless loop does this).
        let mut fds = [PollFd::new(&wake, PollFlags::IN)];
        let woke = poll(&mut fds, Some(&Timespec { tv_sec: 10, tv_nsec: 0 })).unwrap();
        assert_eq!(woke, 1, "the poll fd stayed quiet with {} connections taken, not handed out", WAITING - taken);
        if let Some((mut stream, info)) = listener.try_accept().unwrap() {
            write!(stream, "connection {}", info.id).unwrap();
            taken += 1;
        }
    }
    each_sees_its_answer_and_the_close(clients);
}

#[test]
fn an_async_service_takes_the_waiting_connections_together_and_acks_them_all() {
    let pm = Portmux::start(&[]);
    let port = free_port();
    let route = format!("tcp://:{port}");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut listener =
        rt.block_on(portmux_client::Builder::new().route(&route).control(pm.control()).bind_async()).unwrap();
    let clients = queue_clients(&pm, &route, port, WAITING);
    rt.block_on(async {
        use tokio::io::AsyncWriteExt;
        for _ in 0..WAITING {
            let (mut stream, info) = listener.accept().await.unwrap();
            stream.write_all(format!("connection {}", info.id).as_bytes()).await.unwrap();
        }
    });
    each_sees_its_answer_and_the_close(clients);
    assert_eq!(listener.open_connections(), 0);
}

/// A raw session speaking protocol `version`, holding `route`.
fn raw_session(pm: &Portmux, version: u32, route: &str) -> RawSession {
    let s = RawSession::connect(pm.control());
    s.send(&Message::Hello { version, service: format!("v{version}") });
    s.send(&Message::Register { routes: vec![route.into()] });
    match s.recv() {
        Some((Message::Registered { .. }, None)) => s,
        other => panic!("expected Registered, got {other:?}"),
    }
}

/// The next `n` connections of session `s`: their ids and fds.
fn take(s: &RawSession, n: usize) -> Vec<(u64, OwnedFd)> {
    (0..n)
        .map(|_| match s.recv() {
            Some((Message::Connection { id, .. }, Some(fd))) => (id, fd),
            other => panic!("expected a connection, got {other:?}"),
        })
        .collect()
}

/// Answers and closes each connection.
fn answer(conns: Vec<(u64, OwnedFd)>) {
    for (id, fd) in conns {
        TcpStream::from(fd).write_all(format!("raw {id}").as_bytes()).unwrap();
    }
}

#[test]
fn one_acks_message_acks_every_id_it_names_and_version_1_still_acks_one_by_one() {
    let pm = Portmux::start(&[]);

    // Version 2: one Acks for all of them; an id portmux does not know is ignored.
    let port = free_port();
    let route = format!("tcp://:{port}");
    let s = raw_session(&pm, 2, &route);
    let clients = queue_clients(&pm, &route, port, 3);
    let conns = take(&s, 3);
    let mut ids: Vec<u64> = conns.iter().map(|c| c.0).collect();
    ids.push(u64::MAX);
    s.send(&Message::Acks { ids });
    answer(conns);
    each_sees_its_answer_and_the_close(clients);

    // Version 1: one Ack per connection, as before.
    let port1 = free_port();
    let route1 = format!("tcp://:{port1}");
    let s1 = raw_session(&pm, 1, &route1);
    let clients = queue_clients(&pm, &route1, port1, 2);
    let conns = take(&s1, 2);
    for (id, _) in &conns {
        s1.send(&Message::Ack { id: *id });
    }
    answer(conns);
    each_sees_its_answer_and_the_close(clients);

    // A connection nobody acks stays open in portmux: the client sees no close.
    let mut unacked = client(port);
    let conns = take(&s, 1);
    answer(conns);
    unacked.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut got = [0u8; 64];
    let n = unacked.read(&mut got).unwrap();
    assert!(got[..n].starts_with(b"raw "), "{:?}", &got[..n]);
    let err = unacked.read(&mut got).unwrap_err();
    assert!(matches!(err.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut), "{err}");
}
