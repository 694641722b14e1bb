//! Restarts lose nothing: services that restart within the linger period get
//! the connections queued meanwhile; dying sessions give back what they had
//! not acked; services keep their connections when portmux itself goes away.

use crate::util::*;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

const QUEUED: &str = "queued";

#[test]
fn a_restarted_service_answers_the_requests_that_arrived_while_it_was_down() {
    let pm = Portmux::start(&[]);
    let port = free_port();
    let spec = format!("http://:{port}/w");
    type Stop = fn(&mut Service);
    let stops: [(&str, Stop); 2] = [
        ("crash (SIGKILL)", |s| s.kill()),
        ("graceful stop (SIGTERM, Bye)", |s| {
            s.terminate();
        }),
    ];
    for (how, stop) in stops {
        let mut old = Service::hello(&pm, &spec, "old", &["--name", "web"]);
        assert_eq!(get(port, "x", "/w").unwrap().body, "old");
        stop(&mut old);
        pm.wait_reserved(&spec);
        let waiting: Vec<_> = (0..5)
            .map(|i| thread::spawn(move || get(port, "x", &format!("/w/{i}")).map_err(|e| e.to_string())))
            .collect();
        pm.wait_queued(&spec, 5);
        let _new = Service::hello(&pm, &spec, "new", &["--name", "web"]);
        for w in waiting {
            let r = w.join().unwrap().unwrap_or_else(|e| panic!("{how}: a queued request failed: {e}"));
            assert_eq!((r.status, r.body.as_str()), (200, "new"), "{how}");
        }
    }
}

#[test]
fn a_service_that_does_not_return_gets_its_clients_a_503_or_a_clean_close() {
    let dir = TempDir::new();
    let pki = Pki::new(dir.path());
    let pm = Portmux::start(&["--linger", "1s"]);
    let (http_port, tls_port, tcp_port) = (free_port(), free_port(), free_port());
    let mut web = Service::hello(&pm, &format!("http://:{http_port}"), "web", &[]);
    let (cert, key) = pki.leaf("s.example.test");
    let mut tls = Service::hello(
        &pm,
        &format!("tls://s.example.test:{tls_port}"),
        "tls",
        &["--tls-cert", &cert, "--tls-key", &key],
    );
    let raw = portmux_client::Builder::new().route(format!("tcp://:{tcp_port}")).control(pm.control()).bind().unwrap();
    web.kill();
    tls.kill();
    drop(raw); // Says Bye.

    // Clients of all three kinds arrive while the routes are reserved; they wait.
    let started = Instant::now();
    let http = thread::spawn(move || get(http_port, "x", "/").unwrap());
    let mut hello = Vec::new();
    let name = rustls::pki_types::ServerName::try_from("s.example.test").unwrap();
    rustls::ClientConnection::new(pki.client_config(), name).unwrap().write_tls(&mut hello).unwrap();
    let tls_client = thread::spawn(move || {
        let mut c = client(tls_port);
        c.write_all(&hello).unwrap();
        read_until_close(&mut c)
    });
    let tcp_client = thread::spawn(move || {
        let mut c = client(tcp_port);
        c.write_all(b"hello?").unwrap();
        read_until_close(&mut c)
    });
    let r = http.join().unwrap();
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.body.contains("did not come back within 1s"), "{}", r.body);
    assert!(r.head.contains("Retry-After"), "{}", r.head);
    assert!(started.elapsed() >= Duration::from_millis(500), "the request waited for the service first");
    // TLS and TCP clients get a clean close (FIN, not a reset) at the deadline.
    assert_eq!(tls_client.join().unwrap(), Ok(vec![]), "TLS client: clean close");
    assert_eq!(tcp_client.join().unwrap(), Ok(vec![]), "TCP client: clean close");
    assert!(pm.count(QUEUED) >= 3, "all three waited in queues: {}", pm.log());

    // The released route can be claimed by anyone; an unused listener closes after the linger.
    let _other = Service::hello(&pm, &format!("http://:{http_port}"), "other", &["--name", "other"]);
    assert_eq!(get(http_port, "x", "/").unwrap().body, "other");
    pm.wait_for("the unused TLS listener closing", |pm| !pm.listens_on(tls_port));
    // The socket closes once every worker's accept loop has let go of it.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match std::net::TcpStream::connect(("127.0.0.1", tls_port)) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            other => assert!(Instant::now() < deadline, "the listener closes: {other:?}"),
        }
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn queues_are_bounded_and_a_client_that_hangs_up_frees_its_place() {
    let pm = Portmux::start(&["--park-limit", "2", "--linger", "30s"]);
    let port = free_port();
    let spec = format!("http://:{port}");
    Service::hello(&pm, &spec, "old", &["--name", "q"]).kill();
    let request = |mut c: std::net::TcpStream| {
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        c
    };
    pm.wait_reserved(&spec);
    let first = request(client(port));
    pm.wait_queued(&spec, 1);
    let second = thread::spawn(move || read_response(&mut request(client(port))).unwrap());
    pm.wait_queued(&spec, 2);
    // The queue is full: the third is refused at once, with the reason.
    let r = read_response(&mut request(client(port))).unwrap();
    assert_eq!(r.status, 503);
    assert!(r.body.contains("is full (2 connections)"), "{}", r.body);
    // The first client gives up (closes: a FIN, which looks like a half-close
    // until someone writes to it): its place goes to the next one.
    drop(first);
    pm.wait_for("the first client's FIN seen", |pm| half_closed(pm.route(&spec).as_ref()) == Some(1));
    let fourth = thread::spawn(move || read_response(&mut request(client(port))).unwrap());
    pm.wait_for("the fourth client taking the first one's place", |pm| {
        let r = pm.route(&spec);
        queued(r.as_ref()) == Some(2) && half_closed(r.as_ref()) == Some(0)
    });
    let _new = Service::hello(&pm, &spec, "new", &["--name", "q"]);
    for t in [second, fourth] {
        let r = t.join().unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "new"));
    }
}

#[test]
fn a_queued_client_that_half_closed_after_its_request_keeps_its_place() {
    let pm = Portmux::start(&[]);
    let port = free_port();
    let spec = format!("http://:{port}");
    Service::hello(&pm, &spec, "old", &["--name", "hc"]).kill();
    pm.wait_reserved(&spec);
    // The whole request, then shutdown(SHUT_WR), as HTTP/1.0-style clients and `nc -N` do.
    let mut c = client(port);
    c.write_all(b"GET /hc HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    pm.wait_for("the half-close seen", |pm| {
        let r = pm.route(&spec);
        queued(r.as_ref()) == Some(1) && half_closed(r.as_ref()) == Some(1)
    });
    let _new = Service::hello(&pm, &spec, "new", &["--name", "hc"]);
    let r = read_response(&mut c).unwrap_or_else(|e| panic!("{e}\n{}", pm.log()));
    assert_eq!((r.status, r.body.as_str()), (200, "new"));
}

#[test]
fn connections_a_dying_session_had_not_acked_go_to_another_instance() {
    let pm = Portmux::start(&[]);
    let port = free_port();
    let spec = format!("http://:{port}");
    let raw = RawSession::register(pm.control(), "pool", &[&spec]);
    let waiting = thread::spawn(move || get(port, "x", "/").map_err(|e| e.to_string()));
    // The raw service receives the connection and dies without acking it.
    let (msg, fd) = raw.recv().unwrap();
    assert!(matches!(msg, portmux_wire::Message::Connection { .. }), "{msg:?}");
    assert!(fd.is_some());
    let _survivor = Service::hello(&pm, &spec, "survivor", &["--name", "pool"]);
    drop(fd);
    drop(raw);
    let r = waiting.join().unwrap().unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "survivor"));
    assert!(pm.log().contains("re-routing 1 unacked connections"), "{}", pm.log());
}

#[test]
fn a_rejected_connection_goes_to_another_instance() {
    let pm = Portmux::start(&[]);
    let port = free_port();
    let spec = format!("http://:{port}");
    let raw = RawSession::register(pm.control(), "pool", &[&spec]);
    let waiting = thread::spawn(move || get(port, "x", "/").map_err(|e| e.to_string()));
    let Some((portmux_wire::Message::Connection { id, .. }, Some(_fd))) = raw.recv() else { panic!("no connection") };
    let _other = Service::hello(&pm, &spec, "other instance", &["--name", "pool"]);
    raw.send(&portmux_wire::Message::Reject { id, reason: "too busy".into() });
    let r = waiting.join().unwrap().unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "other instance"));
    assert!(pm.log().contains("connection rejected: too busy"), "{}", pm.log());
}

#[test]
fn a_draining_instance_gets_no_new_connections() {
    let pm = Portmux::start(&[]);
    let port = free_port();
    let spec = format!("http://:{port}");
    let old = portmux_client::Builder::new().route(&spec).name("blue").control(pm.control()).bind().unwrap();
    let _new = Service::hello(&pm, &spec, "new", &["--name", "blue"]);
    old.drain().unwrap();
    pm.wait_for("the old instance draining", |pm| match pm.route(&spec).map(|r| r.target) {
        Some(portmux::admin::TargetView::Service { instances, .. }) => instances.iter().any(|i| i.draining),
        _ => false,
    });
    for _ in 0..10 {
        // Had one reached the drained instance, nobody would answer it.
        assert_eq!(get(port, "x", "/").unwrap().body, "new");
    }
}

#[test]
fn services_keep_their_connections_and_register_again_when_portmux_restarts() {
    let dir = TempDir::new();
    let control = dir.path().join("control.sock");
    let mut pm = Portmux::start_at(&control, &[], None).unwrap();
    let port = free_port();
    let _svc = Service::hello(&pm, &format!("http://:{port}"), "still here", &[]);
    // A blocking-flavour service too: it must reconnect by itself as well.
    // (Under its own host: on a host two services share by path, portmux
    // routes each request itself and stays in the data path.)
    let blocking = portmux_client::Builder::new()
        .route(format!("http://blocking.test:{port}/blocking"))
        .control(&control)
        .bind()
        .unwrap();
    let served = thread::spawn(move || {
        let mut paths = Vec::new();
        for _ in 0..2 {
            let (mut stream, info) = blocking.accept().unwrap();
            paths.push(info.meta.path.unwrap_or_default());
            stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\nblocking").unwrap();
        }
        paths
    });
    assert_eq!(get(port, "blocking.test", "/blocking/1").unwrap().body, "blocking");
    let mut kept = Http::connect(port);
    assert_eq!(kept.get("x", "/").unwrap().body, "still here");
    pm.kill();
    // portmux is out of the data path: the handed-over connection carries on.
    assert_eq!(kept.get("x", "/again").unwrap().body, "still here");
    let pm2 = Portmux::start_at(&control, &[], None).unwrap();
    pm2.wait_instances(&format!("http://:{port}"), 1);
    pm2.wait_instances(&format!("http://blocking.test:{port}/blocking"), 1);
    assert_eq!(get(port, "x", "/").unwrap().body, "still here");
    assert_eq!(kept.get("x", "/third").unwrap().body, "still here");
    assert_eq!(get(port, "blocking.test", "/blocking/2").unwrap().body, "blocking");
    assert_eq!(served.join().unwrap(), ["/blocking/1", "/blocking/2"]);
}

#[test]
fn sigterm_stops_portmux_gracefully() {
    let mut pm = Portmux::start(&[]);
    let port = free_port();
    let _svc = Service::hello(&pm, &format!("http://:{port}"), "served", &[]);
    let mut kept = Http::connect(port);
    assert_eq!(kept.get("x", "/").unwrap().body, "served");
    let control = pm.control().to_path_buf();
    let started = Instant::now();
    assert_eq!(exit_text(pm.terminate(Duration::from_secs(10))), "exit code 0");
    assert!(started.elapsed() < Duration::from_secs(5), "stopping took {:?}", started.elapsed());
    assert!(!control.exists(), "the control socket is removed");
    assert!(!control.with_file_name("admin.sock").exists(), "so is the admin socket");
    assert!(pm.log().contains("SIGTERM: stopping") && pm.log().contains("stopped"), "{}", pm.log());
    assert_eq!(kept.get("x", "/after").unwrap().body, "served", "handed-over connections belong to the service");
    assert_eq!(
        std::net::TcpStream::connect(("127.0.0.1", port)).unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused
    );
}

#[test]
fn a_service_out_of_file_descriptors_gives_its_connections_to_the_pool() {
    let pm = Portmux::start(&[]);
    let port = free_port();
    let spec = format!("http://:{port}");
    let _roomy = Service::hello(&pm, &spec, "roomy", &["--name", "pool"]);
    // hello needs about twelve fds of its own; with a limit of 15 it holds a few connections.
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(format!("ulimit -n 15 && exec {} '{spec}' tight --name pool", example("hello").display()));
    let tight = Service::spawn(cmd, pm.control(), "registered").unwrap();
    let mut held = Vec::new();
    let mut bodies = std::collections::HashMap::<String, usize>::new();
    for _ in 0..16 {
        let mut c = Http::connect(port);
        let r = c.get("x", "/").unwrap();
        assert_eq!(r.status, 200, "every request is served");
        *bodies.entry(r.body).or_default() += 1;
        held.push(c); // Keep each connection open, so the tight instance fills up.
    }
    let tight_served = bodies.get("tight").copied().unwrap_or(0);
    assert!((1..=4).contains(&tight_served), "the tight instance served until its fds ran out: {bodies:?}");
    assert_eq!(bodies.get("roomy").copied().unwrap_or(0), 16 - tight_served, "{bodies:?}");
    assert!(tight.stderr().contains("out of file descriptors"), "{}", tight.stderr());
    assert!(pm.log().contains("connection rejected"), "{}", pm.log());
}

#[test]
fn queued_connections_are_delivered_in_arrival_order() {
    let pm = Portmux::start(&[]);
    let port = free_port();
    let spec = format!("http://:{port}");
    drop(RawSession::register(pm.control(), "ordered", &[&spec]));
    pm.wait_reserved(&spec);
    let mut clients = Vec::new();
    for i in 0..8 {
        let mut c = client(port);
        write!(c, "GET /{i} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        clients.push(c);
        pm.wait_queued(&spec, i + 1);
    }
    let listener = portmux_client::Builder::new().route(&spec).name("ordered").control(pm.control()).bind().unwrap();
    for i in 0..8 {
        let (_stream, info) = listener.accept().unwrap();
        assert_eq!(info.path, Some(format!("/{i}")), "connections come in the order they arrived");
    }
}

#[test]
fn an_event_loop_on_the_poll_fd_accepts_and_reconnects_after_portmux_restarts() {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let dir = TempDir::new();
    let control = dir.path().join("control.sock");
    let mut pm = Portmux::start_at(&control, &[], None).unwrap();
    let port = free_port();
    let listener =
        portmux_client::Builder::new().route(format!("http://:{port}/loop")).control(&control).bind().unwrap();
    let fd = listener.poll_fd().unwrap();
    assert!(listener.try_accept().unwrap().is_none(), "nothing waits yet, and try_accept does not block");
    // One event loop iteration: wait for the fd, then take what there is.
    let next = || -> Option<(portmux_client::Stream, portmux_client::ConnInfo)> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let mut fds = [PollFd::new(&fd, PollFlags::IN)];
            let wait = Timespec { tv_sec: 1, tv_nsec: 0 };
            if poll(&mut fds, Some(&wait)).unwrap() == 0 {
                continue;
            }
            if let Some(conn) = listener.try_accept().unwrap() {
                return Some(conn);
            }
        }
        None
    };
    let answer = |(mut s, info): (portmux_client::Stream, portmux_client::ConnInfo)| {
        let body = info.meta.path.unwrap_or_default();
        write!(s, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
    };
    let client = thread::spawn(move || get(port, "x", "/loop/1").unwrap().body);
    answer(next().expect("the poll fd woke the loop for a connection"));
    assert_eq!(client.join().unwrap(), "/loop/1");

    pm.kill();
    let readable = |ms: i64| {
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        poll(&mut fds, Some(&Timespec { tv_sec: ms / 1000, tv_nsec: ms % 1000 * 1_000_000 })).unwrap() > 0
    };
    assert!(readable(2000), "the session's end wakes the loop");
    assert!(listener.try_accept().unwrap().is_none(), "portmux is down: one failed attempt, no blocking");
    // The dead session left the set (or the loop would spin), and a timer wakes
    // the loop for each next attempt, backing off: a handful of wakeups in
    // 400 ms, not thousands.
    let (mut wakeups, began) = (0, Instant::now());
    while began.elapsed() < Duration::from_millis(400) {
        if readable(50) {
            wakeups += 1;
            assert!(listener.try_accept().unwrap().is_none(), "portmux is still down");
        }
    }
    assert!((2..=20).contains(&wakeups), "{wakeups} wakeups in 400 ms while portmux was down");
    let pm2 = Portmux::start_at(&control, &[], None).unwrap();
    let client = thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        // Refused until the listener has registered again with the new portmux.
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the route never came back");
            thread::sleep(Duration::from_millis(50));
        }
        get(port, "x", "/loop/2").unwrap().body
    });
    answer(next().expect("the loop reconnected and got the next connection"));
    assert_eq!(client.join().unwrap(), "/loop/2");
    assert_eq!(instances(pm2.route(&format!("http://:{port}/loop")).as_ref()), Some(1), "registered again");
    assert_eq!(listener.poll_fd().unwrap().as_raw_fd(), fd.as_raw_fd(), "the poll fd stays the same");
}
