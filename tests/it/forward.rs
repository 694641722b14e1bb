//! Forwarding to backend addresses through the real binary: the route CLI and
//! admin API, seamless mode, load balancing, byte-exact relays, failover,
//! PROXY protocol both ways, and faults that leave no fd behind.

use crate::util::*;
use std::io::{Read, Write};
use std::net::Shutdown;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

fn count<'a>(bodies: impl IntoIterator<Item = &'a str>) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for b in bodies {
        *m.entry(b.to_string()).or_default() += 1;
    }
    m
}

#[test]
fn routes_with_backends_are_added_listed_and_removed_with_the_cli() {
    let pm = Portmux::start(&[]);
    let port = free_port();
    let (_one, a) = Service::backend("one", &[]);
    let (_two, b) = Service::backend("two", &[]);
    let spec = format!("http://:{port}");
    let (ok, out, err) = portmux_cli(&pm, &["route", "add", &spec, "--backend", &format!("{a},{b}")]);
    assert!(ok, "{err}");
    assert!(out.contains(&format!("http://:{port}")) && out.contains("round_robin"), "{out}");
    let bodies: Vec<String> = (0..10).map(|_| get(port, "x", "/").unwrap().body).collect();
    assert_eq!(count(bodies.iter().map(String::as_str)), count(["one"; 5].into_iter().chain(["two"; 5])));

    let (ok, out, _) = portmux_cli(&pm, &["route", "list"]);
    assert!(ok);
    assert!(out.contains(&format!("{a} (up, 0 active)")) && out.contains(&b.to_string()), "{out}");
    let (ok, json, _) = portmux_cli(&pm, &["route", "list", "--json"]);
    assert!(ok && json.contains("\"kind\": \"backends\"") && json.contains("\"connections\": 5"), "{json}");

    // Errors say what was wrong.
    let (ok, _, err) = portmux_cli(&pm, &["route", "add", &spec, "--backend", "nohost"]);
    assert!(!ok && err.contains("host:port"), "{err}");
    let (ok, _, err) = portmux_cli(&pm, &["route", "remove", "tcp://:1"]);
    assert!(!ok && err.contains("no route tcp://:1"), "{err}");

    let (ok, out, _) = portmux_cli(&pm, &["route", "remove", &spec]);
    assert!(ok && out.contains("removed"), "{out}");
    assert_eq!(get(port, "x", "/").unwrap().status, 404, "the listener lingers, with no route");
}

#[test]
fn any_route_spec_forwards_by_port_host_path_or_sni() {
    let dir = TempDir::new();
    let pki = Pki::new(dir.path());
    let pm = Portmux::start(&[]);
    let (http_port, tls_port, tcp_port) = (free_port(), free_port(), free_port());
    let (_api, api) = Service::backend("api backend", &[]);
    let (_default, default) = Service::backend("default backend", &[]);
    let (_path, path) = Service::backend("path backend", &[]);
    let (cert, key) = pki.leaf("t.example.test");
    let (_tls, tls) = Service::backend("tls backend", &["--tls-cert", &cert, "--tls-key", &key]);
    let echo = TestBackend::start("echo", false);
    let add = |spec: String, backend: String| {
        let (ok, _, err) = portmux_cli(&pm, &["route", "add", &spec, "--backend", &backend]);
        assert!(ok, "{spec}: {err}");
    };
    add(format!("http://api.example.test:{http_port}"), api.to_string());
    add(format!("http://:{http_port}"), default.to_string()); // the catch-all: unknown hosts
    add(format!("http://:{http_port}/static"), path.to_string());
    add(format!("tls://t.example.test:{tls_port}"), tls.to_string());
    add(format!("tcp://:{tcp_port}"), echo.addr.to_string());

    assert_eq!(get(http_port, "api.example.test", "/x").unwrap().body, "api backend");
    assert_eq!(get(http_port, "who.knows.test", "/x").unwrap().body, "default backend");
    assert_eq!(get(http_port, "who.knows.test", "/static/app.js").unwrap().body, "path backend");
    let r = tls_get(pki.client_config(), tls_port, "t.example.test", "/", None).unwrap();
    assert_eq!(r.body, "tls backend", "TLS passes through: the backend's certificate verified");
    let (mut s, greeting) = greeted(tcp_port);
    assert_eq!(greeting, "echo");
    s.write_all(b"ping").unwrap();
    let mut pong = [0u8; 4];
    s.read_exact(&mut pong).unwrap();
    assert_eq!(&pong, b"ping");
}

#[test]
fn seamless_mode_switches_backends_without_touching_established_connections() {
    let (port, http) = (free_port(), free_port());
    let first = TestBackend::start("first", false);
    let second = TestBackend::start("second", false);
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_portmux"));
    cmd.args(["tcp", &port.to_string(), &first.addr.to_string(), "--http-port", &http.to_string()]);
    cmd.args(["--bind", "127.0.0.1"]);
    let _pm = Portmux::spawn(cmd, std::path::Path::new("/nonexistent"), None).unwrap();
    let api = AdminAddr::Tcp { addr: std::net::SocketAddr::from(([127, 0, 0, 1], http)), token: None };
    let verb = |path: &str| admin(&api, "GET", path, None);
    assert_eq!(verb("/get"), (200, format!("{}\n", first.addr)));
    let (mut old, name) = greeted(port);
    assert_eq!(name, "first");

    assert_eq!(verb(&format!("/add?backend={}", second.addr)), (200, format!("{},{}\n", first.addr, second.addr)));
    assert_eq!(verb(&format!("/remove?backend={}", first.addr)), (200, format!("{}\n", second.addr)));
    for _ in 0..4 {
        assert_eq!(greeted(port).1, "second", "new connections go to the new backend");
    }
    // The connection made before the switch still reaches the old backend.
    old.write_all(b"still there?").unwrap();
    let mut echo = [0u8; 12];
    old.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"still there?");
    assert_eq!(verb(&format!("/set?backends={},{}", first.addr, second.addr)).0, 200);
    assert_eq!(verb("/get").1, format!("{},{}\n", first.addr, second.addr));

    // Bad parameters get 400 with the reason, as in seamless.
    let (status, body) = verb("/add");
    assert_eq!((status, body.as_str()), (400, "error: missing 'backend' parameter\n"));
    let (status, body) = verb("/remove?backend=127.0.0.1:1");
    assert_eq!((status, body.as_str()), (400, "error: backend '127.0.0.1:1' not found\n"));
    let (status, body) = verb("/set?backends=nonsense");
    assert!(status == 400 && body.contains("not a backend address"), "{body}");
    assert_eq!(verb("/set").0, 400);
}

#[test]
fn the_admin_api_speaks_json_weights_and_clear_errors() {
    let pm = Portmux::start(&[]);
    let (port, svc_port) = (free_port(), free_port());
    let heavy = TestBackend::start("heavy", false);
    let light = TestBackend::start("light", false);
    let api = pm.admin().clone();
    let body = format!(
        r#"{{"route": "tcp://:{port}", "backends": [{{"addr": "{}", "weight": 3}}, "{}"]}}"#,
        heavy.addr, light.addr
    );
    let (status, answer) = admin(&api, "POST", "/routes", Some(&body));
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("\"weight\": 3"), "{answer}");
    let names: Vec<String> = (0..40).map(|_| greeted(port).1).collect();
    assert_eq!(count(names.iter().map(String::as_str)), count(["heavy"; 30].into_iter().chain(["light"; 10])));

    let _svc = Service::hello(&pm, &format!("http://:{svc_port}"), "svc", &["--name", "web"]);
    let cases: &[(&str, &str, Option<&str>, u16, &str)] = &[
        ("POST", "/routes", Some("not json"), 400, "body must be JSON like"),
        ("POST", "/routes", Some(r#"{"route": "nope", "backends": ["a:1"]}"#), 400, "has no scheme"),
        ("POST", "/routes", Some(r#"{"route": "tcp://:1", "backends": []}"#), 400, "no backends"),
        ("POST", "/routes", Some(r#"{"route": "tcp://:1", "backends": ["a:1@500"]}"#), 400, "out of range"),
        (
            "POST",
            "/routes",
            Some(r#"{"route": "tcp://:1", "backends": ["no-such-host.invalid:1"]}"#),
            400,
            "cannot resolve",
        ),
        ("DELETE", "/routes?route=tcp://:1", None, 404, "no route tcp://:1"),
        ("DELETE", "/routes", None, 400, "needs ?route=SPEC"),
        ("PATCH", "/routes", None, 405, "not allowed"),
        ("GET", "/nowhere", None, 404, "no endpoint GET /nowhere"),
    ];
    for (method, path, body, want_status, want) in cases {
        let (status, answer) = admin(&api, method, path, *body);
        assert_eq!(status, *want_status, "{method} {path}: {answer}");
        assert!(answer.contains(want), "{method} {path}: {answer}");
    }
    // A service's route is not the admin API's to take or remove.
    let taken = format!(r#"{{"route": "http://:{svc_port}", "backends": ["{}"]}}"#, light.addr);
    let (status, answer) = admin(&api, "POST", "/routes", Some(&taken));
    assert!(status == 409 && answer.contains("held by service 'web'"), "{answer}");
    let (status, answer) = admin(&api, "DELETE", &format!("/routes?route=http://:{svc_port}"), None);
    assert!(status == 409 && answer.contains("held by service 'web'"), "{answer}");
    // And a service cannot claim a route with backends.
    let refused = Service::try_hello(pm.control(), &format!("tcp://:{port}"), "x", &[]).err().unwrap();
    assert!(refused.contains("forwards to backends set through the admin API"), "{refused}");
    let (status, status_json) = admin(&api, "GET", "/status", None);
    assert!(status == 200 && status_json.contains("\"sessions\": 1"), "{status_json}");
}

/// The active connection counts per backend, from the admin API.
fn actives(pm: &Portmux) -> Vec<(String, u64)> {
    let (_, json) = admin(pm.admin(), "GET", "/routes", None);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    v["routes"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["addr"].as_str().unwrap().to_string(), b["active"].as_u64().unwrap()))
        .collect()
}

#[test]
fn least_connections_sends_new_connections_to_the_idler_backend() {
    let pm = Portmux::start(&[]);
    let port = free_port();
    let a = TestBackend::start("a", false);
    let b = TestBackend::start("b", false);
    let spec = format!("tcp://:{port}?lb=least_conn");
    let (ok, _, err) = portmux_cli(&pm, &["route", "add", &spec, "--backend", &format!("{},{}", a.addr, b.addr)]);
    assert!(ok, "{err}");
    let mut held: Vec<_> = (0..4).map(|_| greeted(port)).collect();
    let on = |name: &str, held: &[(std::net::TcpStream, String)]| held.iter().filter(|(_, n)| n == name).count();
    assert_eq!((on("a", &held), on("b", &held)), (2, 2), "level while nothing ends");
    // Both connections to a end: a is now idle, b still has two.
    held.retain(|(_, n)| n != "a");
    let deadline = Instant::now() + Duration::from_secs(10);
    while actives(&pm).iter().any(|(addr, n)| *addr == a.addr.to_string() && *n > 0) {
        assert!(Instant::now() < deadline, "portmux noticed the closed connections");
        thread::sleep(Duration::from_millis(20));
    }
    // Round robin would alternate; least connections fills a up first.
    let next: Vec<String> = (0..2)
        .map(|_| greeted(port))
        .map(|(s, n)| {
            held.push((s, n.clone()));
            n
        })
        .collect();
    assert_eq!(next, ["a", "a"], "{:?}", actives(&pm));
}

#[test]
fn a_64_mib_transfer_is_byte_exact_both_ways_with_half_close() {
    // On loopback `auto` copies; splice (chosen across a NIC) is forced too.
    for mode in ["auto", "splice"] {
        transfer_64_mib(mode);
    }
}

fn transfer_64_mib(mode: &str) {
    let pm = Portmux::start(&["--relay-mode", mode]);
    let port = free_port();
    let echo = TestBackend::start("echo", false);
    let (ok, _, err) =
        portmux_cli(&pm, &["route", "add", &format!("tcp://:{port}"), "--backend", &echo.addr.to_string()]);
    assert!(ok, "{err}");
    const SIZE: usize = 64 << 20;
    let data: Vec<u8> = (0..SIZE).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let (mut s, name) = greeted(port);
    assert_eq!(name, "echo");
    let mut writer = s.try_clone().unwrap();
    let sent = data.clone();
    let t = thread::spawn(move || {
        writer.write_all(&sent).unwrap();
        writer.shutdown(Shutdown::Write).unwrap(); // half-close: the echo must still come back whole
    });
    let mut back = Vec::with_capacity(SIZE);
    s.read_to_end(&mut back).unwrap();
    t.join().unwrap();
    assert_eq!(back.len(), SIZE, "{mode}");
    assert!(back == data, "64 MiB came back byte-exact ({mode})");
}

#[test]
fn connect_failures_fail_over_and_an_all_dead_route_answers_502() {
    let pm = Portmux::start(&[]);
    let (port, tcp_port) = (free_port(), free_port());
    let dead = std::net::SocketAddr::from(([127, 0, 0, 1], free_port())); // nothing listens there
    let (_live, live) = Service::backend("live", &[]);
    let (ok, _, err) =
        portmux_cli(&pm, &["route", "add", &format!("http://:{port}"), "--backend", &format!("{dead},{live}")]);
    assert!(ok, "{err}");
    for i in 0..20 {
        let r = get(port, "x", "/").unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "live"), "request {i}");
    }
    let (_, json) = admin(pm.admin(), "GET", "/routes", None);
    assert!(json.contains("\"healthy\": false"), "the dead backend is skipped for a while: {json}");
    assert!(pm.log().contains("backend failed to connect"), "{}", pm.log());

    let dead2 = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let (ok, _, _) =
        portmux_cli(&pm, &["route", "add", &format!("http://:{port}"), "--backend", &format!("{dead},{dead2}")]);
    assert!(ok);
    let r = get(port, "x", "/").unwrap();
    assert_eq!(r.status, 502, "{r:?}");
    assert!(r.body.contains("no backend of route"), "{}", r.body);
    let (ok, _, _) = portmux_cli(&pm, &["route", "add", &format!("tcp://:{tcp_port}"), "--backend", &dead.to_string()]);
    assert!(ok);
    let mut c = client(tcp_port);
    assert_eq!(read_until_close(&mut c), Ok(vec![]), "a TCP client gets a clean close");
}

#[test]
fn a_backend_that_never_accepts_times_out_and_the_next_one_serves() {
    let pm = Portmux::start(&["--connect-timeout", "300ms"]);
    let port = free_port();
    // A listener with a full backlog that never accepts: connects to it hang.
    let stuck = rustix::net::socket(rustix::net::AddressFamily::INET, rustix::net::SocketType::STREAM, None).unwrap();
    rustix::net::bind(&stuck, &std::net::SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    rustix::net::listen(&stuck, 0).unwrap();
    let stuck_addr = std::net::SocketAddr::try_from(rustix::net::getsockname(&stuck).unwrap()).unwrap();
    let _fillers: Vec<_> = (0..3)
        .filter_map(|_| std::net::TcpStream::connect_timeout(&stuck_addr, Duration::from_millis(200)).ok())
        .collect();
    let (_live, live) = Service::backend("live", &[]);
    let spec = format!("http://:{port}?lb=least_conn");
    let (ok, _, err) = portmux_cli(&pm, &["route", "add", &spec, "--backend", &format!("{stuck_addr},{live}")]);
    assert!(ok, "{err}");
    for _ in 0..3 {
        let started = Instant::now();
        let r = get(port, "x", "/").unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "live"));
        assert!(started.elapsed() < Duration::from_secs(3), "a hanging connect costs at most the timeout");
    }
    assert!(pm.log().contains("connect timed out"), "{}", pm.log());
}

#[test]
fn backends_learn_the_client_address_through_proxy_protocol() {
    let pm = Portmux::start(&[]);
    let (v1_port, v2_port) = (free_port(), free_port());
    let backend = TestBackend::start("proxied", true);
    for (port, v) in [(v1_port, "v1"), (v2_port, "v2")] {
        let spec = format!("tcp://:{port}?proxy={v}");
        let (ok, _, err) = portmux_cli(&pm, &["route", "add", &spec, "--backend", &backend.addr.to_string()]);
        assert!(ok, "{err}");
    }
    let (c1, _) = greeted(v1_port);
    let (c2, _) = greeted(v2_port);
    let headers = backend.headers.lock().unwrap().clone();
    let p1 = c1.local_addr().unwrap().port();
    assert_eq!(String::from_utf8_lossy(&headers[0]), format!("PROXY TCP4 127.0.0.1 127.0.0.1 {p1} {v1_port}\r\n"));
    let v2 = &headers[1];
    assert!(v2.starts_with(b"\r\n\r\n\0\r\nQUIT\n\x21\x11"), "v2, PROXY command, TCP over IPv4: {v2:?}");
    assert_eq!(&v2[16..20], &[127, 0, 0, 1]);
    assert_eq!(u16::from_be_bytes([v2[24], v2[25]]), c2.local_addr().unwrap().port());
    assert_eq!(u16::from_be_bytes([v2[26], v2[27]]), v2_port);
}

#[test]
fn behind_a_load_balancer_client_addresses_survive_both_ways() {
    let pm = Portmux::start(&["--accept-proxy", "127.0.0.0/8"]);
    let (svc_port, fwd_port) = (free_port(), free_port());
    let listener =
        portmux_client::Builder::new().route(format!("http://:{svc_port}")).control(pm.control()).bind().unwrap();
    let backend = TestBackend::start("fwd", true);
    let spec = format!("tcp://:{fwd_port}?proxy=v1");
    let (ok, _, err) = portmux_cli(&pm, &["route", "add", &spec, "--backend", &backend.addr.to_string()]);
    assert!(ok, "{err}");

    // Handoff: the service sees the address from the header, and no header bytes.
    let mut c = client(svc_port);
    c.write_all(b"PROXY TCP4 203.0.113.9 192.0.2.1 5555 443\r\nGET /x HTTP/1.1\r\nHost: h\r\n\r\n").unwrap();
    let (mut stream, info) = listener.accept().unwrap();
    assert_eq!(info.peer, "203.0.113.9:5555".parse().unwrap());
    assert_eq!(info.local, "192.0.2.1:443".parse().unwrap());
    let mut first = [0u8; 6];
    stream.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"GET /x");

    // Forward: a v2 header in, a v1 header with the same client out.
    let mut c = client(fwd_port);
    let v2 = [
        b"\r\n\r\n\0\r\nQUIT\n".as_slice(),
        &[0x21, 0x11, 0, 12, 198, 51, 100, 7, 192, 0, 2, 1, 0x1f, 0x90, 0x01, 0xbb],
    ]
    .concat();
    c.write_all(&v2).unwrap();
    let mut greeting = [0u8; 4];
    c.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting, b"fwd\n");
    assert_eq!(
        String::from_utf8_lossy(&backend.headers.lock().unwrap()[0]),
        "PROXY TCP4 198.51.100.7 192.0.2.1 8080 443\r\n"
    );

    // Without a header the connection is closed, unanswered.
    let mut c = client(fwd_port);
    c.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let closed = read_until_close(&mut c);
    assert!(closed.as_ref().map_or(true, |b| b.is_empty()), "{closed:?}");
    assert!(pm.wait_log("no PROXY protocol header", Duration::from_secs(5)), "{}", pm.log());
}

#[test]
fn faults_are_answered_and_fds_return_to_baseline() {
    // Pooled backend connections of the per-request engine expire within the wait too.
    let pm = Portmux::start(&["--idle-timeout", "1s", "--peek-timeout", "1s", "--pool-idle-timeout", "1s"]);
    let (http_port, tcp_port, reset_port) = (free_port(), free_port(), free_port());
    let (_web, web) = Service::backend("web", &[]);
    let echo = TestBackend::start("echo", false);
    // A backend that accepts and then never says anything.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    // A backend that answers, then resets mid-stream.
    let resetter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let reset_addr = resetter.local_addr().unwrap();
    thread::spawn(move || {
        for mut s in resetter.incoming().flatten() {
            let mut first = [0u8; 1];
            let _ = s.read_exact(&mut first);
            let _ = s.write_all(b"partial answer");
            rustix::net::sockopt::set_socket_linger(&s, Some(Duration::ZERO)).unwrap();
            drop(s);
        }
    });
    let add =
        |spec: String, backend: String| assert!(portmux_cli(&pm, &["route", "add", &spec, "--backend", &backend]).0);
    add(format!("http://:{http_port}"), web.to_string());
    add(format!("tcp://:{tcp_port}"), echo.addr.to_string());
    add(format!("tcp://:{reset_port}"), reset_addr.to_string());
    let silent_port = free_port();
    add(format!("tcp://:{silent_port}"), silent.local_addr().unwrap().to_string());

    assert_eq!(get(http_port, "x", "/").unwrap().body, "web");
    let baseline = fd_count(pm.pid());
    let started = Instant::now();
    let mut storm = Vec::new();
    for i in 0..30 {
        storm.push(thread::spawn(move || match i % 5 {
            // Backend resets mid-stream: the client gets what was sent, then the end.
            0 => {
                let mut c = client(reset_port);
                let _ = c.write_all(b"x");
                let mut got = Vec::new();
                let _ = c.read_to_end(&mut got);
                assert!(got.is_empty() || got.starts_with(b"partial"), "{got:?}");
            }
            // Backend never answers: the idle timeout ends it.
            1 => {
                let mut c = client(silent_port);
                let _ = c.write_all(b"hello?");
                let _ = read_until_close(&mut c);
            }
            // Client never reads while the backend echoes a lot back.
            2 => {
                let mut c = client(tcp_port);
                let _ = c.set_write_timeout(Some(Duration::from_secs(3)));
                let chunk = vec![7u8; 1 << 20];
                for _ in 0..16 {
                    if c.write_all(&chunk).is_err() {
                        break;
                    }
                }
                thread::sleep(Duration::from_millis(1500));
            }
            // Client vanishes mid-request.
            3 => {
                let mut c = client(http_port);
                let _ = c.write_all(b"GET / HTTP/1.1\r\nHo");
            }
            // A client that connects and says nothing.
            _ => {
                let mut c = client(http_port);
                let _ = read_until_close(&mut c);
            }
        }));
        // Everyone else keeps being served meanwhile.
        assert_eq!(get(http_port, "x", "/").unwrap().body, "web", "good request {i}");
    }
    for t in storm {
        t.join().unwrap();
    }
    assert!(started.elapsed() < Duration::from_secs(30));
    let left = wait_fds_at_most(pm.pid(), baseline, Duration::from_secs(10));
    assert!(left <= baseline, "fds back to baseline: {left} > {baseline}");
    assert!(pm.log().contains("backend failed while portmux was"), "{}", pm.log());
    assert_eq!(get(http_port, "x", "/").unwrap().body, "web");
}

#[test]
fn ten_thousand_connections_near_the_fd_limit() {
    // 10 000 relayed connections need 20 000 fds; portmux gets 16 000. (The
    // per-request engine would reuse a few pooled backend connections
    // instead: the whole-connection relay is the one to push to the limit.)
    let pm = Portmux::start_with_ulimit(
        "-n 16000",
        &["--peek-timeout", "30s", "--max-conns-per-ip", "20000", "--max-conns", "20000"],
    );
    let port = free_port();
    let (_web, web) = Service::backend("web", &[]);
    let spec = format!("http://:{port}?mode=connection");
    assert!(portmux_cli(&pm, &["route", "add", &spec, "--backend", &web.to_string()]).0);
    assert_eq!(get(port, "x", "/").unwrap().body, "web");
    let baseline = fd_count(pm.pid());

    const N: usize = 10_000;
    let mut conns = Vec::with_capacity(N);
    let mut refused = 0;
    for _ in 0..N {
        match std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500)) {
            Ok(s) => conns.push(s),
            Err(_) => refused += 1,
        }
    }
    for c in &mut conns {
        let _ = c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    }
    // Collect the answers from every socket at once, until no more arrive for 5 s
    // (those beyond portmux's fd limit wait in its accept backlog, unanswered).
    let mut got = vec![Vec::new(); conns.len()];
    let mut answered = 0;
    let mut last_progress = Instant::now();
    for c in &conns {
        c.set_nonblocking(true).unwrap();
    }
    while answered < conns.len() && last_progress.elapsed() < Duration::from_secs(5) {
        for (c, buf) in conns.iter_mut().zip(got.iter_mut()) {
            if buf.ends_with(b"web") {
                continue;
            }
            let mut chunk = [0u8; 512];
            if let Ok(n) = c.read(&mut chunk)
                && n > 0
            {
                buf.extend_from_slice(&chunk[..n]);
                if buf.ends_with(b"web") {
                    answered += 1;
                    last_progress = Instant::now();
                }
            }
        }
        thread::sleep(Duration::from_millis(10));
    }
    let rss = std::fs::read_to_string(format!("/proc/{}/status", pm.pid())).unwrap();
    // Near the limit every connection gets the answer, or a clear 503 when portmux
    // could not open its backend connection, or waits in the accept backlog; never
    // a reset or garbage. Which of the first two depends on which side of a relay
    // runs out of fds first.
    let waiting = got.iter().filter(|b| b.is_empty()).count();
    let unavailable = got
        .iter()
        .filter(|b| b.starts_with(b"HTTP/1.1 503") && String::from_utf8_lossy(b).contains("out of file descriptors"))
        .count();
    assert_eq!(
        answered + unavailable + waiting,
        conns.len(),
        "every outcome is clear: {answered} + {unavailable} + {waiting}"
    );
    assert!(answered >= 5_000, "answered {answered}, 503 {unavailable}, waiting {waiting}, refused {refused} of {N}");
    assert!(
        pm.log().contains("cannot accept") || pm.log().contains("out of resources"),
        "portmux said it hit its fd limit"
    );
    assert!(!pm.log().contains("it is skipped for"), "its own fd shortage is not blamed on the backend");
    drop(conns);
    let left = wait_fds_at_most(pm.pid(), baseline, Duration::from_secs(30));
    assert!(left <= baseline, "fds back to baseline: {left} > {baseline}");
    let r = get(port, "x", "/").unwrap();
    assert_eq!(r.body, "web", "served again afterwards");
    let peak = rss.lines().find(|l| l.starts_with("VmHWM")).unwrap_or("");
    eprintln!("answered {answered}, 503 {unavailable}, waiting {waiting}, refused {refused}; {peak}");
}

#[test]
fn large_responses_stay_byte_exact_over_keep_alive_copied_or_spliced() {
    // The bench's 1 MiB scenario: hello --size repeats its body; in splice mode
    // the relay switches that direction to splice mid-response, and the
    // connection then carries more answers, byte-exact.
    let (_big, big) = Service::backend("0123456789abcdef", &["--size", "1048577"]);
    let expected: String = "0123456789abcdef".chars().cycle().take(1_048_577).collect();
    for mode in ["auto", "splice"] {
        let pm = Portmux::start(&["--relay-mode", mode]);
        let port = free_port();
        assert!(portmux_cli(&pm, &["route", "add", &format!("http://:{port}"), "--backend", &big.to_string()]).0);
        let mut c = Http::connect(port);
        for i in 0..5 {
            let r = c.get("x", "/").unwrap_or_else(|e| panic!("{mode}, request {i}: {e}"));
            assert_eq!(r.status, 200);
            assert!(r.body == expected, "{mode}, request {i}: {} bytes, exact: false", r.body.len());
        }
    }
}

#[test]
fn a_low_soft_fd_limit_is_raised_to_the_hard_limit() {
    // systemd starts services with a soft limit of 1024 (here 200) and a high
    // hard limit; 300 relayed connections need 600 fds.
    let pm = Portmux::start_with_ulimit("-Sn 200 -Hn 4000", &[]);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", pm.pid())).unwrap();
    let open_files = limits.lines().find(|l| l.starts_with("Max open files")).unwrap().to_string();
    assert_eq!(open_files.split_whitespace().nth(3), Some("4000"), "{open_files}");
    let port = free_port();
    let (_web, web) = Service::backend("web", &[]);
    assert!(portmux_cli(&pm, &["route", "add", &format!("http://:{port}"), "--backend", &web.to_string()]).0);
    let mut conns: Vec<Http> = (0..300).map(|_| Http::connect(port)).collect();
    for (i, c) in conns.iter_mut().enumerate() {
        assert_eq!(c.get("x", "/").unwrap_or_else(|e| panic!("connection {i}: {e}")).body, "web");
    }
}

#[test]
fn a_unix_socket_backend_is_served() {
    let dir = TempDir::new();
    let pm = Portmux::start(&[]);
    let port = free_port();
    let path = dir.path().join("app.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            thread::spawn(move || {
                let _ = s.write_all(b"unix\n");
                let mut buf = [0u8; 64];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let backend = format!("unix:{}", path.display());
    let (ok, _, err) = portmux_cli(&pm, &["route", "add", &format!("tcp://:{port}"), "--backend", &backend]);
    assert!(ok, "{err}");
    let (mut s, greeting) = greeted(port);
    assert_eq!(greeting, "unix");
    s.write_all(b"over a unix socket").unwrap();
    let mut back = [0u8; 18];
    s.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"over a unix socket");
    let (_, json) = admin(pm.admin(), "GET", "/routes", None);
    assert!(json.contains(&format!("\"unix:{}\"", path.display())), "{json}");
}
