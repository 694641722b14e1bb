//! Lent ports (`?lend`): a port's one service accepts from portmux's
//! listening socket itself; portmux takes the port back (and queues) while
//! no instance holds it, keeps the loan across an upgrade, refuses to share
//! a lent port, and shuts the socket down when the route goes.

use crate::util::*;
use portmux::admin::TargetView;
use portmux_wire::Message;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, OwnedFd};
use std::thread;
use std::time::Duration;

/// Whether `route`'s port is lent to one of its instances, as the status says.
pub fn lent(pm: &Portmux, route: &str) -> bool {
    matches!(pm.route(route).map(|r| r.target), Some(TargetView::Service { lent: true, .. }))
}

/// How many of `route`'s connections portmux handed over itself.
pub fn handed_off(pm: &Portmux, route: &str) -> u64 {
    pm.route(route).and_then(|r| r.counts).map_or(0, |c| c.handed_off)
}

/// How many of `pid`'s fds are the listening socket on `port`.
fn listener_copies(pid: u32, port: u16) -> usize {
    let listening = ["/proc/net/tcp", "/proc/net/tcp6"].iter().find_map(|table| {
        let text = std::fs::read_to_string(table).ok()?;
        text.lines().skip(1).find_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f.get(1)?.rsplit(':').next()?;
            (u16::from_str_radix(local_port, 16).ok()? == port && f.get(3)? == &"0A").then(|| f[9].to_string())
        })
    });
    let Some(inode) = listening else { return 0 };
    let want = format!("socket:[{inode}]");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap();
    fds.flatten().filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy() == want)).count()
}

/// Takes the next connection from a lent (non-blocking) listening socket,
/// once it is readable.
fn accept_lent(listener: &OwnedFd) -> OwnedFd {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let mut fds = [PollFd::new(listener, PollFlags::IN)];
    let ready = poll(&mut fds, Some(&Timespec { tv_sec: 10, tv_nsec: 0 })).unwrap();
    assert_eq!(ready, 1, "no connection reached the lent socket within 10 s");
    let accepted = portmux_sys::net::accept_waiting(listener.as_fd(), false).unwrap();
    accepted.expect("the connection that made it readable").0
}

#[test]
fn a_lent_port_is_served_by_its_service_and_queued_by_portmux_while_it_restarts() {
    let pm = Portmux::start(&[]);
    let port = free_port();
    let route = format!("http://:{port}?lend");
    let mut first = Service::hello(&pm, &route, "first", &[]);
    pm.wait_for("the port lent", |pm| lent(pm, &route));
    for _ in 0..20 {
        assert_eq!(get(port, "x", "/").unwrap().body, "first");
    }
    assert_eq!(handed_off(&pm, &route), 0, "the service accepted every connection itself");

    // The service dies: portmux accepts for the route again, and queues.
    first.kill();
    pm.wait_reserved(&route);
    assert!(!lent(&pm, &route), "portmux took the port back");
    let waiting: Vec<_> = (0..3).map(|i| thread::spawn(move || get(port, "x", &format!("/{i}")))).collect();
    pm.wait_queued(&route, 3);
    let _second = Service::hello(&pm, &route, "second", &[]);
    for w in waiting {
        assert_eq!(w.join().unwrap().unwrap().body, "second", "a connection queued during the restart is served");
    }
    pm.wait_for("the port lent again", |pm| lent(pm, &route));
    let through_portmux = handed_off(&pm, &route);
    assert!(through_portmux >= 3, "the queued connections were handed over: {through_portmux}");
    for _ in 0..10 {
        assert_eq!(get(port, "x", "/").unwrap().body, "second");
    }
    assert_eq!(handed_off(&pm, &route), through_portmux, "lent again: nothing more went through portmux");
}

#[test]
fn a_lent_port_has_no_other_route_and_each_refusal_says_why() {
    let pm = Portmux::start(&[]);
    let (port, other) = (free_port(), free_port());
    let _lent = Service::hello(&pm, &format!("http://:{port}?lend"), "lent", &[]);
    let err = Service::try_hello(pm.control(), &format!("http://a.test:{port}"), "x", &["--name", "b"]).err().unwrap();
    assert!(err.contains(&format!("lends port {port}")) && err.contains("claim without lend"), "{err}");
    let (ok, _, out) =
        portmux_cli(&pm, &["route", "add", &format!("http://b.test:{port}"), "--backend", "127.0.0.1:9"]);
    assert!(!ok && out.contains(&format!("lends port {port}")), "{out}");

    // The other way round: a port with a route cannot be lent.
    let _host = Service::hello(&pm, &format!("http://a.test:{other}"), "host", &["--name", "c"]);
    let err = Service::try_hello(pm.control(), &format!("http://:{other}?lend"), "x", &["--name", "c"]).err().unwrap();
    assert!(err.contains(&format!("lends port {other}")), "{err}");

    // Routes with backends are portmux's to serve; lend is for services.
    let spec = format!("tcp://:{}?lend", free_port());
    let (ok, _, out) = portmux_cli(&pm, &["route", "add", &spec, "--backend", "127.0.0.1:9"]);
    assert!(!ok && out.contains("a route with backends"), "{out}");
    // A spec that names a host cannot be lent: every connection goes to the service unread.
    let err = Service::try_hello(pm.control(), &format!("http://a.test:{}?lend", free_port()), "x", &[]).err().unwrap();
    assert!(err.contains("names no host or path"), "{err}");

    // A client library too old to take a listening socket is refused, not stranded.
    let old = RawSession::connect(pm.control());
    old.send(&Message::Hello { version: 2, service: "old".into() });
    old.send(&Message::Register { routes: vec![format!("tcp://:{}?lend", free_port())] });
    match old.recv() {
        Some((Message::Refused { reason, .. }, _)) => assert!(reason.contains("control protocol 3"), "{reason}"),
        other => panic!("expected Refused, got {other:?}"),
    }
    assert_eq!(get(port, "x", "/").unwrap().body, "lent", "the lent port serves throughout");
}

#[test]
fn a_drained_loan_goes_back_and_the_socket_is_shut_down_when_the_route_goes() {
    let pm = Portmux::start(&["--linger", "1s"]);
    let port = free_port();
    let route = format!("tcp://:{port}?lend");
    let session = RawSession::register(pm.control(), "raw", &[&route]);
    let (msg, fd) = session.recv().expect("the loan");
    let Message::Lend { route: lent_route, listen } = msg else { panic!("expected Lend, got {msg:?}") };
    assert_eq!((lent_route.as_str(), listen.port()), (route.as_str(), port));
    let listener = fd.expect("the listening socket comes with the Lend");

    // It accepts as the service's own listening socket would.
    let mut c = client(port);
    let mut accepted = TcpStream::from(accept_lent(&listener));
    c.write_all(b"ping").unwrap();
    let mut got = [0u8; 4];
    accepted.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
    assert_eq!(accepted.peer_addr().unwrap(), c.local_addr().unwrap(), "the client's own address");

    // Drained, the session holds no loan: portmux accepts and queues (this
    // test keeps its copy, as a service that ignores the protocol would).
    session.send(&Message::Drain);
    pm.wait_for("the loan back", |pm| !lent(pm, &route));
    let _queued = client(port);
    pm.wait_queued(&route, 1);

    // The route goes (Bye, then the 1 s reservation): the socket is shut
    // down, so the copy kept here accepts nothing more...
    session.send(&Message::Bye);
    pm.wait_gone(&route);
    pm.wait_for("the listener closed", |pm| !pm.listens_on(port));
    let err = portmux_sys::net::accept_waiting(listener.as_fd(), false).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "not listening any more: {err}");
    // ...and the port is free for the next claim, on a fresh socket.
    let _next = Service::hello(&pm, &format!("http://:{port}"), "next", &["--name", "next"]);
    assert_eq!(get(port, "x", "/").unwrap().body, "next");
    assert_eq!(portmux_sys::net::accept_waiting(listener.as_fd(), false).unwrap_err().kind(), err.kind());
}

#[test]
fn a_lent_port_stays_lent_across_an_upgrade_and_is_taken_back_after_it() {
    let mut pm = Portmux::start(&[]);
    let port = free_port();
    let route = format!("http://:{port}?lend");
    let mut svc = Service::hello(&pm, &route, "lent", &[]);
    pm.wait_for("the port lent", |pm| lent(pm, &route));
    assert_eq!(listener_copies(svc.pid(), port), 1);
    let old = pm.pid();
    pm.upgrade(&[]).unwrap();
    assert_ne!(pm.pid(), old);
    assert!(lent(&pm, &route), "the new process knows the port is lent");
    for _ in 0..10 {
        assert_eq!(get(port, "x", "/").unwrap().body, "lent");
    }
    assert_eq!(handed_off(&pm, &route), 0, "the new process does not accept on a lent port");
    // The new process lent the socket again (the previous one may not have
    // reached the session); the copy replaced the one held, none piled up.
    assert!(pm.wait_log("lent the listening socket", Duration::from_secs(10)), "{}", pm.log());
    assert_eq!(get(port, "x", "/").unwrap().body, "lent");
    assert_eq!(listener_copies(svc.pid(), port), 1, "the second copy replaced the first");

    svc.kill();
    pm.wait_reserved(&route);
    let waiting = thread::spawn(move || get(port, "x", "/"));
    pm.wait_queued(&route, 1);
    let _next = Service::hello(&pm, &route, "next", &[]);
    assert_eq!(waiting.join().unwrap().unwrap().body, "next", "queued by the new process, then served");
}

#[test]
fn the_blocking_listener_accepts_from_a_lent_port_in_both_styles() {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let pm = Portmux::start(&[]);
    let port = free_port();
    let route = format!("tcp://:{port}?lend");
    let listener = portmux_client::Builder::new().route(&route).control(pm.control()).bind().unwrap();
    pm.wait_for("the port lent", |pm| lent(pm, &route));

    // accept(), as threads and libportmux's blocking callers use it.
    let c = client(port);
    let (mut s, info) = listener.accept().unwrap();
    assert_eq!(
        (info.peer, info.route.as_str(), info.proto),
        (c.local_addr().unwrap(), route.as_str(), portmux_wire::Proto::Tcp)
    );
    s.write_all(b"one").unwrap();
    let mut got = [0u8; 3];
    (&c).read_exact(&mut got).unwrap();
    assert_eq!(&got, b"one");

    // poll_fd() and try_accept(), as event loops use them.
    assert!(listener.try_accept().unwrap().is_none(), "nothing waits yet");
    let c2 = client(port);
    let poll_fd = listener.poll_fd().unwrap();
    let mut fds = [PollFd::new(&poll_fd, PollFlags::IN)];
    let timeout = Timespec { tv_sec: 10, tv_nsec: 0 };
    assert_eq!(poll(&mut fds, Some(&timeout)).unwrap(), 1, "the poll fd wakes for the lent socket");
    let (_s2, info2) = listener.try_accept().unwrap().expect("the waiting connection");
    assert_eq!(info2.peer, c2.local_addr().unwrap());
    assert_eq!(handed_off(&pm, &route), 0, "both came straight from the socket");

    // Drain gives the loan back at once.
    listener.drain().unwrap();
    pm.wait_for("the loan back", |pm| !lent(pm, &route));
}

#[test]
fn a_keep_alive_connection_of_a_lent_port_outlives_a_graceful_restart() {
    let pm = Portmux::start(&[]);
    let port = free_port();
    let route = format!("http://:{port}?lend");
    let mut first = Service::hello(&pm, &route, "first", &[]);
    pm.wait_for("the port lent", |pm| lent(pm, &route));
    let mut conn = Http::connect(port);
    assert_eq!(conn.get("x", "/1").unwrap().body, "first");
    // SIGTERM: the service drains, gives the idle connection back to portmux
    // (it accepted it itself, from the lent socket) and stops.
    assert!(first.terminate().is_some_and(|s| s.success()), "{}", first.stderr());
    pm.wait_reserved(&route);
    let _second = Service::hello(&pm, &route, "second", &[]);
    assert_eq!(conn.get("x", "/2").unwrap().body, "second", "the same connection, served by the next instance");
}

#[test]
fn an_async_accept_cancelled_while_it_waits_keeps_the_loan() {
    let pm = Portmux::start(&[]);
    let port = free_port();
    let route = format!("tcp://:{port}?lend");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut listener =
        rt.block_on(portmux_client::Builder::new().route(&route).control(pm.control()).bind_async()).unwrap();
    pm.wait_for("the port lent", |pm| lent(pm, &route));
    // Accepts given up while nothing comes (a select, a timeout around them).
    for _ in 0..3 {
        let waited = rt.block_on(async { tokio::time::timeout(Duration::from_millis(50), listener.accept()).await });
        assert!(waited.is_err(), "nothing to accept yet");
    }
    let c = client(port);
    let accepted = rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), listener.accept()).await });
    let (_, info) = accepted.expect("the lent socket is still there").unwrap();
    assert_eq!(info.peer, c.local_addr().unwrap());
    assert_eq!(handed_off(&pm, &route), 0);
}
