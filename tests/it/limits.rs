//! Limits: a flood from one client (or one user) meets its limit, is told so,
//! and the others are served; every hit is counted in /status.

use crate::security::{NOBODY, admit_nobody, as_nobody};
use crate::util::*;
use portmux_wire::Message;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// A TCP connection to 127.0.0.1:`port` from the loopback address `from`
/// (127.0.0.2, …: another client, as far as portmux can tell).
fn connect_from(from: [u8; 4], port: u16) -> TcpStream {
    use rustix::net::{AddressFamily, SocketType, bind, connect, socket};
    let fd = socket(AddressFamily::INET, SocketType::STREAM, None).unwrap();
    bind(&fd, &SocketAddr::from((from, 0))).unwrap();
    connect(&fd, &SocketAddr::from(([127, 0, 0, 1], port))).unwrap();
    let s = TcpStream::from(fd);
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// How often `name` refused, as /status says.
fn hits(pm: &Portmux, name: &str) -> u64 {
    pm.status().limits.iter().find(|l| l.name == name).unwrap_or_else(|| panic!("no limit {name}")).hits
}

/// Clients from `from` that have sent half a request head (they wait in the peek phase).
fn half_heads(from: [u8; 4], port: u16, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|_| {
            let mut s = connect_from(from, port);
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
            s
        })
        .collect()
}

#[test]
fn one_address_over_its_limit_gets_429_while_others_are_served() {
    let pm = Portmux::start(&["--max-conns-per-ip", "20"]);
    let port = free_port();
    let _svc = Service::hello(&pm, &format!("http://:{port}"), "served", &[]);
    let _flood = half_heads([127, 0, 0, 2], port, 20);
    pm.wait_for("20 flood connections peeked at", |pm| pm.status().peeking == 20);
    for _ in 0..5 {
        let mut over = connect_from([127, 0, 0, 2], port);
        over.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let r = read_response(&mut over).unwrap();
        assert!(
            r.status == 429 && r.body.contains("too many connections from your address (the limit is 20)"),
            "{r:?}"
        );
        assert!(r.head.contains("Retry-After: 1"), "{}", r.head);
    }
    for _ in 0..5 {
        assert_eq!(get(port, "x", "/").unwrap().body, "served", "another client is served");
    }
    assert_eq!(hits(&pm, "conns-per-ip"), 5);
}

#[test]
fn the_total_and_the_peek_phase_are_bounded_and_free_again_when_the_flood_ends() {
    let pm = Portmux::start(&["--max-peeking", "10", "--max-conns-per-ip", "6"]);
    let (port, raw) = (free_port(), free_port());
    let _svc = Service::hello(&pm, &format!("http://:{port}"), "served", &[]);
    let _tcp = Service::hello(&pm, &format!("tcp://127.0.0.1:{raw}"), "tcp", &[]);
    // One flooding address takes only its share: others are served.
    let first = half_heads([127, 0, 0, 2], port, 6);
    pm.wait_for("6 peeked at", |pm| pm.status().peeking == 6);
    assert_eq!(get(port, "x", "/").unwrap().body, "served");
    // Two more take the rest of the peek phase: new clients are turned away.
    let second = half_heads([127, 0, 0, 3], port, 4);
    pm.wait_for("10 peeked at", |pm| pm.status().peeking == 10);
    let r = get(port, "x", "/").unwrap();
    assert!(r.status == 503 && r.body.contains("limit of peeking (--max-peeking)"), "{r:?}");
    // On a port that is not HTTP-only the refusal is a close.
    let mut s = TcpStream::connect(("127.0.0.1", raw)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(s.read(&mut buf).unwrap(), 0, "closed without a word");
    assert!(hits(&pm, "peeking") >= 2);
    drop((first, second));
    pm.wait_for("the flood gone", |pm| pm.status().peeking == 0);
    assert_eq!(get(port, "x", "/").unwrap().body, "served");

    let pm = Portmux::start(&["--max-conns", "8"]);
    let port = free_port();
    let _svc = Service::hello(&pm, &format!("http://:{port}"), "served", &[]);
    let flood = half_heads([127, 0, 0, 2], port, 8);
    pm.wait_for("8 held", |pm| pm.status().peeking == 8);
    let r = get(port, "x", "/").unwrap();
    assert!(r.status == 503 && r.body.contains("limit of conns (--max-conns)"), "{r:?}");
    drop(flood);
    pm.wait_for("the flood gone", |pm| pm.status().peeking == 0);
    assert_eq!(get(port, "x", "/").unwrap().body, "served");
    assert_eq!(hits(&pm, "conns"), 1);
}

#[test]
fn queues_for_absent_services_are_bounded_in_all() {
    let pm = Portmux::start(&["--max-parked", "3", "--linger", "60s"]);
    let port = free_port();
    let route = format!("http://:{port}");
    let mut svc = Service::hello(&pm, &route, "back", &[]);
    svc.kill();
    pm.wait_reserved(&route);
    let mut waiting: Vec<TcpStream> = (0..3)
        .map(|i| {
            let mut s = client(port);
            write!(s, "GET /{i} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            s
        })
        .collect();
    pm.wait_queued(&route, 3);
    let r = get(port, "x", "/over").unwrap();
    assert!(r.status == 503 && r.body.contains("--max-parked"), "{r:?}");
    assert_eq!(hits(&pm, "parked"), 1);
    // The queued ones are served when the service is back.
    let _back = Service::hello(&pm, &route, "back", &[]);
    for s in &mut waiting {
        assert_eq!(read_response(s).unwrap().body, "back");
    }
}

#[test]
fn sessions_are_bounded_in_all_and_per_user() {
    let pm = Portmux::start(&["--max-sessions-per-uid", "2", "--max-sessions", "6"]);
    admit_nobody(&pm);
    // One user's sessions: the third is refused, root's still come in.
    let hello = |i: usize| {
        let mut cmd = as_nobody(&example("hello"));
        cmd.args([format!("http://n{i}.test:{}", free_port()), "x".into(), "--name".into(), format!("n{i}")]);
        Service::spawn(cmd, pm.control(), "registered")
    };
    let _a = hello(1).unwrap();
    let _b = hello(2).unwrap();
    let e = hello(3).err().expect("refused");
    assert!(
        e.contains(&format!("uid {NOBODY} has 2 control sessions open, the limit (--max-sessions-per-uid)")),
        "{e}"
    );
    let _root = Service::hello(&pm, &format!("http://:{}", free_port()), "root", &[]);
    let _root2 = Service::hello(&pm, &format!("http://:{}", free_port()), "root", &[]);
    let _root3 = RawSession::connect(pm.control());
    let _root4 = RawSession::connect(pm.control());
    // Six are open: a third user is refused…
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args(["--reuid=65533", &format!("--regid={NOBODY}"), "--clear-groups", "--"]).arg(example("hello"));
    cmd.args([&format!("http://third.test:{}", free_port()), "x", "--name", "third"]);
    let e = Service::spawn(cmd, pm.control(), "registered").err().expect("refused");
    assert!(e.contains("portmux has 6 control sessions open, the limit (--max-sessions)"), "{e}");
    // …while root's services still get in: others cannot lock them out.
    let root5 = RawSession::register(pm.control(), "root5", &[&format!("http://:{}", free_port())]);
    assert_eq!((hits(&pm, "sessions-per-uid"), hits(&pm, "sessions")), (1, 1));
    drop(root5);
}

#[test]
fn routes_listeners_and_backends_per_session_and_route_are_bounded() {
    let pm = Portmux::start(&[
        "--max-routes-per-session",
        "3",
        "--max-listeners-per-session",
        "2",
        "--max-backends-per-route",
        "2",
    ]);
    // Routes and listening addresses per session.
    let register = |routes: Vec<String>| {
        let s = RawSession::connect(pm.control());
        s.send(&Message::Hello { version: portmux_wire::PROTOCOL_VERSION, service: "many".into() });
        s.send(&Message::Register { routes });
        match s.recv() {
            Some((Message::Refused { reason, .. }, _)) => reason,
            other => panic!("{other:?}"),
        }
    };
    let p = free_port();
    let e = register((0..4).map(|i| format!("http://h{i}.test:{p}")).collect());
    assert!(e.contains("a session with 0 routes asked for 4 more: more than the limit of 3"), "{e}");
    let e = register((0..3).map(|_| format!("http://:{}", free_port())).collect());
    assert!(e.contains("need 3 listening addresses: more than the limit of 2"), "{e}");

    // Backends per route.
    let body = format!(r#"{{"route": "tcp://:{}", "backends": ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]}}"#, p);
    let (status, answer) = admin(pm.admin(), "POST", "/routes", Some(&body));
    assert!(status == 400 && answer.contains("given 3 backends: more than the limit of 2"), "{status} {answer}");
    let hit = |name| hits(&pm, name);
    assert_eq!((hit("routes-per-session"), hit("listeners-per-session"), hit("backends-per-route")), (1, 1, 1));
}

#[test]
fn admin_connections_are_bounded_in_number_time_and_size() {
    let pm = Portmux::start(&["--max-admin-conns", "2", "--admin-header-timeout", "1s", "--max-admin-body", "100"]);
    let sock = pm.control().with_file_name("admin.sock");
    let mut idle: Vec<std::os::unix::net::UnixStream> =
        (0..2).map(|_| std::os::unix::net::UnixStream::connect(&sock).unwrap()).collect();
    // A third is closed at once (hyper has not read it: nothing comes back).
    let mut third = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    third.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = third.write_all(b"GET /status HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let mut buf = Vec::new();
    let _ = third.read_to_end(&mut buf);
    assert!(buf.is_empty(), "{}", String::from_utf8_lossy(&buf));
    // The two that send nothing are closed after the header timeout.
    let start = Instant::now();
    for s in &mut idle {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.read_to_end(&mut buf);
    }
    assert!(start.elapsed() < Duration::from_secs(5), "closed after about 1 s: {:?}", start.elapsed());
    // Then requests are served again; a body over the cap is refused.
    let long = format!(r#"{{"route": "tcp://:1", "backends": ["{}"]}}"#, "a".repeat(200));
    let (status, body) = admin(pm.admin(), "POST", "/routes", Some(&long));
    assert!(status == 413 && body.contains("limit 100 bytes, --max-admin-body"), "{status} {body}");
    let hit = |name| hits(&pm, name);
    assert_eq!((hit("admin-conns"), hit("admin-body")), (1, 1));
    assert!(hit("admin-header-timeout") >= 1);

    // TCP clients (anyone on the host, a browser) have their own share: the socket stays free.
    let dir = TempDir::new();
    let control = dir.path().join("control.sock");
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_portmux"));
    cmd.args(["run", "--bind", "127.0.0.1", "--admin", "127.0.0.1:0", "--max-admin-conns", "2", "--control"]);
    cmd.arg(&control);
    let pm = Portmux::spawn(cmd, &control, None).unwrap();
    let tcp = tcp_admin_from_ready(pm.ready_line()).unwrap();
    let _hogs: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(tcp).unwrap()).collect();
    pm.wait_for("the TCP share taken", |pm| {
        let mut s = TcpStream::connect(tcp).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let _ = s.write_all(b"GET /status HTTP/1.1\r\nHost: localhost\r\n\r\n");
        let mut b = [0u8; 1];
        !matches!(s.read(&mut b), Ok(1)) && pm.status().state == "serving"
    });
    assert_eq!(pm.status().state, "serving", "the socket answers");
}

#[test]
fn a_proxy_header_from_outside_the_trusted_networks_is_refused() {
    let pm = Portmux::start(&["--accept-proxy", "10.0.0.0/8"]);
    let port = free_port();
    let _svc = Service::hello(&pm, &format!("http://:{port}"), "served", &[]);
    let out = raw_exchange(port, b"PROXY TCP4 203.0.113.9 192.0.2.1 5555 80\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(out.is_empty(), "closed without an answer: {}", String::from_utf8_lossy(&out));
    // A client that sends no header is served as itself.
    assert_eq!(get(port, "x", "/").unwrap().body, "served");
}

#[test]
fn behind_trusted_proxies_silent_clients_still_count_against_the_limits() {
    // Clients outside --accept-proxy's networks are peeked at for a header
    // they must not send: they are admitted (and counted) first.
    let pm = Portmux::start(&["--accept-proxy", "10.0.0.0/8", "--max-conns-per-ip", "5"]);
    let port = free_port();
    let _svc = Service::hello(&pm, &format!("http://:{port}"), "served", &[]);
    let _silent: Vec<TcpStream> = (0..5).map(|_| connect_from([127, 0, 0, 2], port)).collect();
    pm.wait_for("5 silent clients peeked at", |pm| pm.status().peeking == 5);
    let mut over = connect_from([127, 0, 0, 2], port);
    over.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut over).unwrap().status, 429);
    assert_eq!(get(port, "x", "/").unwrap().body, "served", "another address is served");
}

#[test]
fn three_thousand_slow_clients_do_not_stop_others_being_served() {
    let pm = Portmux::start(&[]);
    let port = free_port();
    let _svc = Service::hello(&pm, &format!("http://:{port}"), "served", &[]);
    // Six addresses, 500 each (under the default per-address limit of 1024).
    let head = b"GET / HTTP/1.1\r\nHost: slow\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaa";
    let mut slow: Vec<TcpStream> = (0..3000)
        .map(|i| {
            let mut s = connect_from([127, 0, 0, 2 + (i % 6) as u8], port);
            s.write_all(&head[..1]).unwrap();
            s
        })
        .collect();
    pm.wait_for("3000 slow clients peeked at", |pm| pm.status().peeking == 3000);
    let start = Instant::now();
    let mut served = 0;
    // They trickle a byte each in turn; between rounds, others are served.
    for round in 1..9 {
        for s in &mut slow {
            let _ = s.write_all(&head[round..round + 1]);
        }
        let t = Instant::now();
        assert_eq!(get(port, "x", "/").unwrap().body, "served");
        assert!(t.elapsed() < Duration::from_secs(5), "served in {:?}", t.elapsed());
        served += 1;
    }
    assert_eq!(served, 8);
    assert!(start.elapsed() < Duration::from_secs(30));
    assert_eq!(pm.status().peeking, 3000, "the slow ones are still there, waiting");
}

#[test]
fn the_connection_limit_follows_the_open_file_limit_unless_given() {
    let pm = Portmux::start_with_ulimit("-n 4096", &[]);
    let conns = |pm: &Portmux| pm.status().limits.iter().find(|l| l.name == "conns").unwrap().limit;
    assert_eq!(conns(&pm), (4096 - 1024) / 2, "two fds per relayed connection, 1024 kept");
    let pm = Portmux::start_with_ulimit("-n 4096", &["--max-conns", "100"]);
    assert_eq!(conns(&pm), 100);
}
