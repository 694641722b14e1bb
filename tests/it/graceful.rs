//! Services restart without dropping a connection: under wrk load (a new
//! connection per request, and keep-alive) a service restarted with SIGTERM
//! five times loses no request; a keep-alive client keeps its one connection
//! across restarts; a blue/green swap under load has no error; connections
//! given back for a route that left, or by a session that does not hold the
//! route, are closed or refused.

use crate::util::*;
use portmux_wire::Message;
use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// wrk against `port` with `connections` connections, each request on a new
/// connection when `close`, until [`stop`] (at most a minute).
pub fn wrk(port: u16, connections: u32, close: bool) -> Child {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t1", &format!("-c{connections}"), "-d60s", "--timeout", "10s"]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(format!("http://127.0.0.1:{port}/")).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd.spawn().expect("wrk is installed (scripts/test installs it)")
}

/// Stops a [`wrk`] run (SIGINT: wrk ends its run and reports) and returns its
/// report: the number of requests, or what went wrong (socket errors, non-2xx
/// answers), with the whole report.
pub fn stop(child: Child) -> Result<u64, String> {
    let pid = rustix::process::Pid::from_child(&child);
    rustix::process::kill_process(pid, rustix::process::Signal::INT).expect("wrk runs");
    let out = child.wait_with_output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    if !out.status.success() || report.contains("Socket errors") || report.contains("Non-2xx") {
        return Err(report);
    }
    report
        .lines()
        .find_map(|l| l.trim().split_once(" requests in ").and_then(|(n, _)| n.trim().parse().ok()))
        .ok_or(report)
}

/// Restarts a service `restarts` times (SIGTERM, the instance ends by
/// itself, 300 ms without any, the next instance) while two wrk runs load its
/// route, one with a new connection per request and one keep-alive; neither
/// may see a socket error or an answer other than 2xx. A failure shows what
/// each instance wrote to stderr, and portmux's log.
pub fn restarts_under_load(pm: &Portmux, start: &dyn Fn() -> Service, port: u16, restarts: usize) {
    let mut svc = start();
    let mut said = String::new();
    assert_eq!(get(port, "x", "/").unwrap().status, 200);
    let loads = [wrk(port, 4, true), wrk(port, 4, false)];
    thread::sleep(Duration::from_millis(500)); // the load runs
    let started = Instant::now();
    for i in 0..restarts {
        let status = svc.terminate();
        said += &svc.stderr();
        assert!(
            status.is_some_and(|s| s.success()),
            "restart {i}: the service stops by itself: {}\n{said}",
            exit_text(status)
        );
        thread::sleep(Duration::from_millis(300)); // nobody serves the route now
        svc = start();
        thread::sleep(Duration::from_millis(200));
    }
    assert!(started.elapsed() < Duration::from_secs(50), "the restarts ended within wrk's minute");
    thread::sleep(Duration::from_millis(500)); // the last instance serves the load
    for (load, what) in loads.into_iter().zip(["a new connection per request", "keep-alive"]) {
        let requests = stop(load).unwrap_or_else(|report| {
            panic!("{what}: requests failed:\n{report}\nthe instances said:\n{said}\nportmux:\n{}", pm.log())
        });
        assert!(requests > 100, "{what}: the load ran ({requests} requests)");
    }
}

#[test]
fn a_service_restarted_under_load_loses_no_request() {
    let pm = Portmux::start(&[]);
    let port = free_port();
    let spec = format!("http://:{port}");
    let start = || Service::hello(&pm, &spec, "up", &["--name", "web"]);
    restarts_under_load(&pm, &start, port, 5);
}

#[test]
fn a_keep_alive_client_keeps_its_one_connection_across_restarts() {
    let pm = Portmux::start(&[]);
    let port = free_port();
    let spec = format!("http://:{port}");
    let mut svc = Service::hello(&pm, &spec, "v0", &["--name", "web"]);
    // The instances that answered, in order, as the client saw them.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let bodies = seen.clone();
    let client = thread::spawn(move || {
        let mut connects = 1;
        let mut http = Http::connect(port);
        let started = Instant::now();
        // Until the last instance answered, or 30 s (bounded either way).
        while bodies.lock().unwrap().last().is_none_or(|b| b != "v3") && started.elapsed() < Duration::from_secs(30) {
            match http.get("x", "/") {
                Ok(r) => {
                    assert_eq!(r.status, 200, "{r:?}");
                    let mut bodies = bodies.lock().unwrap();
                    if bodies.last() != Some(&r.body) {
                        bodies.push(r.body);
                    }
                }
                Err(_) => {
                    connects += 1;
                    http = Http::connect(port);
                }
            }
            thread::sleep(Duration::from_millis(100));
        }
        connects
    });
    for version in 1..=3 {
        // Each instance answers the client before it is restarted.
        let previous = format!("v{}", version - 1);
        pm.wait_for(&format!("{previous} answered"), |_| seen.lock().unwrap().last() == Some(&previous));
        assert!(svc.terminate().is_some_and(|s| s.success()));
        svc = Service::hello(&pm, &spec, &format!("v{version}"), &["--name", "web"]);
    }
    let connects = client.join().unwrap();
    let bodies = seen.lock().unwrap().clone();
    assert_eq!(connects, 1, "one TCP connection throughout ({bodies:?})");
    assert_eq!(bodies, ["v0", "v1", "v2", "v3"], "each instance answered it in turn");
}

#[test]
fn a_blue_green_swap_under_load_has_no_error() {
    let pm = Portmux::start(&[]);
    let port = free_port();
    let spec = format!("http://:{port}");
    let mut blue = Service::hello(&pm, &spec, "blue", &["--name", "web"]);
    let loads = [wrk(port, 4, true), wrk(port, 4, false)];
    thread::sleep(Duration::from_millis(1000));
    // The new instance registers under the same name; the old one shuts down gracefully.
    let _green = Service::hello(&pm, &spec, "green", &["--name", "web"]);
    pm.wait_instances(&spec, 2);
    thread::sleep(Duration::from_millis(500));
    assert!(blue.terminate().is_some_and(|s| s.success()));
    pm.wait_instances(&spec, 1);
    thread::sleep(Duration::from_millis(500)); // green alone serves the load
    for (load, what) in loads.into_iter().zip(["a new connection per request", "keep-alive"]) {
        stop(load).unwrap_or_else(|report| panic!("{what}: requests failed during the swap:\n{report}"));
    }
    for _ in 0..5 {
        assert_eq!(get(port, "x", "/").unwrap().body, "green");
    }
}

/// Registers `service` on `routes`, takes one connection for the first route
/// (its client's first request read and answered), and returns it.
fn answered(pm: &Portmux, port: u16, service: &str, routes: &[&str]) -> (RawSession, std::os::fd::OwnedFd, Http) {
    let raw = RawSession::register(pm.control(), service, routes);
    let mut client = Http::connect(port);
    write!(client.stream, "GET /first HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let Some((Message::Connection { id, .. }, Some(fd))) = raw.recv() else { panic!("no connection") };
    raw.send(&Message::Ack { id });
    let mut conn = std::net::TcpStream::from(fd.try_clone().unwrap());
    let mut head = [0u8; 31];
    conn.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"GET /first HTTP/1.1\r\nHost: x\r\n\r");
    let mut last = [0u8; 1];
    conn.read_exact(&mut last).unwrap();
    conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst").unwrap();
    assert_eq!(read_response(&mut client.stream).unwrap().body, "first");
    (raw, fd, client)
}

#[test]
fn a_given_back_connection_whose_route_left_is_closed_cleanly() {
    let pm = Portmux::start(&["--linger", "1s"]);
    let port = free_port();
    let spec = format!("http://:{port}");
    let (raw, fd, mut client) = answered(&pm, port, "leaving", &[&spec]);
    let local: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let peer = client.stream.local_addr().unwrap();
    let msg = portmux_wire::encode(&Message::GiveBack { route: spec.clone(), peer, local }).unwrap();
    raw.send_with_fd(&msg, fd.as_fd()).unwrap();
    drop(fd);
    pm.wait_for("the connection held", |pm| pm.status().idle == 1);
    drop(raw);
    pm.wait_gone(&spec);
    // The route left while the connection was held: its next request gets a
    // clean close (the client retries on a new connection), not an answer.
    write!(client.stream, "GET /second HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(read_until_close(&mut client.stream), Ok(vec![]));
    assert_eq!(get(port, "x", "/").unwrap().status, 404, "a new connection gets the answer");
}

#[test]
fn a_connection_given_back_for_a_route_the_session_does_not_hold_is_refused() {
    let pm = Portmux::start(&[]);
    let (port, other) = (free_port(), free_port());
    let spec = format!("http://:{port}");
    let theirs = format!("http://:{other}");
    let _holder = RawSession::register(pm.control(), "holder", &[&theirs]);
    let (raw, fd, client) = answered(&pm, port, "mine", &[&spec]);
    let local: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let peer = client.stream.local_addr().unwrap();
    let msg = portmux_wire::encode(&Message::GiveBack { route: theirs.clone(), peer, local }).unwrap();
    raw.send_with_fd(&msg, fd.as_fd()).unwrap();
    match raw.recv() {
        Some((Message::Error { reason }, _)) => {
            assert!(reason.contains(&format!("does not hold route {theirs}")), "{reason}");
        }
        other => panic!("expected an Error, got {other:?}"),
    }
    assert!(raw.recv().is_none(), "the session ended");
    // Nor may a session give back a socket that is not a client of its route.
    let (raw, _fd, client) = answered(&pm, port, "mine", &[&spec]);
    let stranger = std::net::TcpStream::connect(("127.0.0.1", other)).unwrap();
    let peer = client.stream.local_addr().unwrap();
    let msg = portmux_wire::encode(&Message::GiveBack { route: spec.clone(), peer, local }).unwrap();
    raw.send_with_fd(&msg, stranger.as_fd()).unwrap();
    match raw.recv() {
        Some((Message::Error { reason }, _)) => {
            assert!(reason.contains("not a client connection of this route"), "{reason}")
        }
        other => panic!("expected an Error, got {other:?}"),
    }
}

/// axum serving `app` on `spec` as service "web", on a runtime of its own,
/// shutting down gracefully (portmux's `graceful().after`) when the switch
/// returned is sent; and axum's task.
fn axum_web(
    pm: &Portmux,
    spec: &str,
    app: axum::Router,
) -> (tokio::runtime::Runtime, tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<std::io::Result<()>>) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let listener =
        rt.block_on(portmux_client::Builder::new().route(spec).name("web").control(pm.control()).bind_async()).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = rt.spawn(async move {
        let graceful = listener.graceful().after(async {
            let _ = stopped.await;
        });
        axum::serve(listener, app).with_graceful_shutdown(graceful).await
    });
    (rt, stop, served)
}

/// Waits (10 s at most) for axum's task to return, as it does once its
/// connections are gone.
fn axum_returned(rt: &tokio::runtime::Runtime, served: tokio::task::JoinHandle<std::io::Result<()>>) {
    rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), served).await })
        .expect("axum returns once its connections are gone")
        .unwrap()
        .unwrap();
}

/// Sends a request on `http` and returns the answer's body.
fn body_of(http: &mut Http, path: &str) -> String {
    let r = http.get("x", path).unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    r.body
}

#[test]
fn axum_shuts_down_gracefully_and_its_keep_alive_connections_move_on() {
    let pm = Portmux::start(&[]);
    let port = free_port();
    let spec = format!("http://:{port}");
    let (rt, stop, served) = axum_web(&pm, &spec, axum::Router::new().fallback(|| async { "axum" }));
    let mut http = Http::connect(port);
    assert_eq!(body_of(&mut http, "/1"), "axum");
    stop.send(()).unwrap();
    axum_returned(&rt, served);
    let _next = Service::hello(&pm, &spec, "next", &["--name", "web"]);
    assert_eq!(body_of(&mut http, "/2"), "next", "the same connection, served by the next instance");
}

#[test]
fn the_blocking_listener_shuts_down_gracefully_and_gives_its_connections_back() {
    let pm = Portmux::start(&[]);
    let port = free_port();
    let spec = format!("http://:{port}");
    let listener = std::sync::Arc::new(
        portmux_client::Builder::new().route(&spec).name("web").control(pm.control()).bind().unwrap(),
    );
    // One thread per connection: read a request, answer, repeat until end-of-file.
    let acceptor = listener.clone();
    thread::spawn(move || {
        while let Ok((stream, _)) = acceptor.accept() {
            thread::spawn(move || {
                let mut reader = std::io::BufReader::new(&stream);
                let mut line = String::new();
                loop {
                    line.clear();
                    match std::io::BufRead::read_line(&mut reader, &mut line) {
                        Ok(0) | Err(_) => return, // end-of-file: dropped, the stream goes back
                        Ok(_) if line == "\r\n" => {
                            (&stream).write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nblocking").unwrap();
                        }
                        Ok(_) => {}
                    }
                }
            });
        }
    });
    let mut http = Http::connect(port);
    assert_eq!(body_of(&mut http, "/1"), "blocking");
    let open = listener.shutdown(Duration::from_secs(10)).unwrap();
    assert_eq!(open, 0, "every connection was given back");
    assert!(listener.accept().is_err(), "a shut down listener accepts nothing");
    let _next = Service::hello(&pm, &spec, "next", &["--name", "web"]);
    assert_eq!(body_of(&mut http, "/2"), "next", "the same connection, served by the next instance");
}

/// Reads one request head from `stream` and answers it with `body`.
fn answer_one(stream: &mut (impl Read + Write), body: &str) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    write!(stream, "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}", body.len()).unwrap();
}

#[test]
fn a_listener_dropped_mid_shutdown_keeps_the_session_until_its_connections_went_back() {
    // axum's order: the shutdown begins, the listener is dropped, and only
    // then do the connections end. Their give-backs still need the session.
    let pm = Portmux::start(&[]);
    let (port, other) = (free_port(), free_port());
    let spec = format!("http://:{port}");
    let listener = portmux_client::Builder::new().route(&spec).name("web").control(pm.control()).bind().unwrap();
    let mut http = Http::connect(port);
    write!(http.stream, "GET /1 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let (mut stream, _) = listener.accept().unwrap();
    answer_one(&mut stream, "blocking");
    assert_eq!(read_response(&mut http.stream).unwrap().body, "blocking");
    listener.begin_shutdown().unwrap();
    drop(listener);
    let mut buf = [0u8; 16];
    assert_eq!(stream.read(&mut buf).unwrap(), 0, "between requests, a read ends during the shutdown");
    drop(stream);

    // The same with the tokio listener, on a second route.
    let spec2 = format!("http://:{other}");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut listener = rt
        .block_on(portmux_client::Builder::new().route(&spec2).name("web2").control(pm.control()).bind_async())
        .unwrap();
    let mut http2 = Http::connect(other);
    write!(http2.stream, "GET /1 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let (mut stream, _) = rt.block_on(listener.accept()).unwrap();
    rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(stream.read_u8().await.unwrap());
        }
        stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\ntokio").await.unwrap();
    });
    assert_eq!(read_response(&mut http2.stream).unwrap().body, "tokio");
    listener.graceful().begin();
    drop(listener);
    drop(stream);

    let _next = Service::hello(&pm, &spec, "next", &["--name", "web"]);
    let _next2 = Service::hello(&pm, &spec2, "next2", &["--name", "web2"]);
    assert_eq!(body_of(&mut http, "/2"), "next", "the same connection, served by the next instance");
    assert_eq!(body_of(&mut http2, "/2"), "next2", "the same connection, served by the next instance");
}

#[test]
fn connections_a_listener_never_accepted_go_back_when_it_goes() {
    let pm = Portmux::start(&[]);
    let port = free_port();
    let spec = format!("http://:{port}");
    let mut first = Service::hello(&pm, &spec, "first", &["--name", "web"]);
    assert!(first.terminate().is_some_and(|s| s.success()));
    // Clients queue for the next instance; it arrives (the queue reaches it
    // at once) and goes away without accepting any, the blocking listener
    // once and the tokio one once.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut clients = Vec::new();
    for round in 0..2 {
        for _ in 0..3 {
            let mut http = Http::connect(port);
            write!(http.stream, "GET /q HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            clients.push(http);
        }
        pm.wait_queued(&spec, clients.len());
        let builder = portmux_client::Builder::new().route(&spec).name("web").control(pm.control());
        if round == 0 {
            drop(builder.bind().unwrap());
        } else {
            drop(rt.block_on(builder.bind_async()).unwrap());
        }
    }
    let _next = Service::hello(&pm, &spec, "next", &["--name", "web"]);
    for mut client in clients {
        let r = read_response(&mut client.stream).unwrap_or_else(|e| panic!("{e}\n{}", pm.log()));
        assert_eq!(r.body, "next", "served by the instance that accepted it");
    }
}

#[test]
fn axum_finishes_a_response_in_progress_and_then_its_connection_moves_on() {
    let pm = Portmux::start(&[]);
    let port = free_port();
    let spec = format!("http://:{port}");
    let (began, beginning) = std::sync::mpsc::channel::<()>();
    let (go, going) = tokio::sync::watch::channel(false);
    // The handler starts, waits for the test's go (the shutdown began by
    // then), and streams its response in five chunks, 100 ms apart.
    let stream = move || async move {
        let _ = began.send(());
        let _ = going.clone().wait_for(|go| *go).await;
        let parts = futures_util::stream::unfold(0, |i| async move {
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (i < 5).then(|| (Ok::<_, std::io::Error>(format!("part{i};")), i + 1))
        });
        axum::body::Body::from_stream(parts)
    };
    let app = axum::Router::new().route("/stream", axum::routing::get(stream));
    let (rt, stop, served) = axum_web(&pm, &spec, app);
    let mut http = Http::connect(port);
    write!(http.stream, "GET /stream HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    beginning.recv_timeout(Duration::from_secs(10)).expect("the handler runs");
    // The shutdown begins while the request is in progress, its answer not started.
    stop.send(()).unwrap();
    pm.wait_for("the service draining", |pm| {
        matches!(pm.route(&spec).map(|r| r.target),
            Some(portmux::admin::TargetView::Service { instances, .. }) if instances.iter().all(|i| i.draining))
    });
    go.send_replace(true);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(b"0\r\n\r\n") {
        let n = http.stream.read(&mut buf).unwrap();
        assert!(n > 0, "the response was cut: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let got = String::from_utf8_lossy(&got).to_lowercase();
    assert!(got.contains("part0;") && got.contains("part4;"), "the whole response arrived: {got}");
    assert!(!got.contains("connection: close"), "the connection is kept: {got}");
    axum_returned(&rt, served);
    let _next = Service::hello(&pm, &spec, "next", &["--name", "web"]);
    assert_eq!(body_of(&mut http, "/2"), "next", "the same connection, served by the next instance");
}

#[test]
fn a_held_connection_moves_to_the_new_process_in_an_upgrade() {
    let mut pm = Portmux::start(&[]);
    let port = free_port();
    let spec = format!("http://:{port}");
    let mut old = Service::hello(&pm, &spec, "old", &["--name", "web"]);
    let mut http = Http::connect(port);
    assert_eq!(body_of(&mut http, "/1"), "old");
    assert!(old.terminate().is_some_and(|s| s.success()));
    pm.wait_for("the connection held", |pm| pm.status().idle == 1);
    let before = pm.pid();
    let after = pm.upgrade(&[]).unwrap_or_else(|e| panic!("upgrade: {e}\n{}", pm.log()));
    assert_ne!(before, after);
    pm.wait_for("the new process holds the connection", |pm| pm.status().idle == 1);
    let _new = Service::hello(&pm, &spec, "new", &["--name", "web"]);
    assert_eq!(body_of(&mut http, "/2"), "new", "the same connection, through the new portmux");
}

#[test]
fn a_held_connection_is_closed_after_the_keepalive_timeout() {
    let pm = Portmux::start(&["--keepalive-timeout", "1s"]);
    let port = free_port();
    let spec = format!("http://:{port}");
    let mut svc = Service::hello(&pm, &spec, "up", &["--name", "web"]);
    let mut http = Http::connect(port);
    assert_eq!(body_of(&mut http, "/1"), "up");
    assert!(svc.terminate().is_some_and(|s| s.success()));
    pm.wait_for("the connection held", |pm| pm.status().idle == 1);
    // No next request: portmux closes it cleanly at the timeout.
    assert_eq!(read_until_close(&mut http.stream), Ok(vec![]));
    assert_eq!(pm.status().idle, 0);
}

#[test]
fn an_untouched_raw_tcp_connection_given_back_is_routed_at_once() {
    // A protocol where the server speaks first: the client sends nothing, so
    // portmux must not wait for its bytes before routing it again.
    let pm = Portmux::start(&["--keepalive-timeout", "60s"]);
    let port = free_port();
    let spec = format!("tcp://:{port}");
    let first = RawSession::register(pm.control(), "db", &[&spec]);
    let mut silent = client(port);
    let Some((Message::Connection { id, .. }, Some(fd))) = first.recv() else { panic!("no connection") };
    first.send(&Message::Ack { id });
    first.send(&Message::Drain);
    let local: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let peer = silent.local_addr().unwrap();
    let msg = portmux_wire::encode(&Message::GiveBack { route: spec.clone(), peer, local }).unwrap();
    first.send_with_fd(&msg, fd.as_fd()).unwrap();
    drop(fd);
    let next = RawSession::register(pm.control(), "db", &[&spec]);
    let started = Instant::now();
    let Some((Message::Connection { id, .. }, Some(fd))) = next.recv() else { panic!("not routed again") };
    assert!(started.elapsed() < Duration::from_secs(10), "routed without waiting for the client");
    next.send(&Message::Ack { id });
    std::net::TcpStream::from(fd).write_all(b"220 ready\r\n").unwrap();
    let mut greeting = [0u8; 11];
    silent.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting, b"220 ready\r\n");
}

#[test]
fn closing_a_blocking_listener_wakes_its_acceptor_which_does_not_reconnect() {
    let pm = Portmux::start(&[]);
    let port = free_port();
    let spec = format!("http://:{port}");
    let listener = std::sync::Arc::new(
        portmux_client::Builder::new().route(&spec).name("web").control(pm.control()).bind().unwrap(),
    );
    let (done, finished) = std::sync::mpsc::channel();
    let acceptor = listener.clone();
    thread::spawn(move || {
        let _ = done.send(acceptor.accept().map(|_| ()));
    });
    pm.wait_instances(&spec, 1);
    thread::sleep(Duration::from_millis(100)); // the acceptor waits inside accept (no signal says so)
    listener.close();
    let accepted = finished.recv_timeout(Duration::from_secs(10)).expect("the waiting accept returns");
    assert!(accepted.is_err(), "a closed listener accepts nothing");
    pm.wait_instances(&spec, 0);
    assert!(listener.accept().is_err(), "nor later");
    assert_eq!(instances(pm.route(&spec).as_ref()), Some(0), "it did not register again");
}
