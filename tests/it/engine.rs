//! The per-request engine through the real binary: every request of a
//! keep-alive connection routed by its own path (to backends and to
//! services), pipelining, framing checked on every request (the
//! http_desync_guardian corpus), pooled backend connections, WebSocket
//! upgrades, the header rules, the per-request errors, HTTP/2 over TLS with
//! its floods, and keep-alive clients across `portmux upgrade`.

use crate::util::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// A backend that records every byte and connection it receives. It
/// answers each request with its name (keep-alive), `/ws` with a 101 and
/// then echoes, and never answers `/slow`.
struct Recorder {
    addr: SocketAddr,
    bytes: Arc<Mutex<Vec<u8>>>,
    conns: Arc<AtomicUsize>,
}

impl Recorder {
    fn start(name: &'static str) -> Recorder {
        let bytes = Arc::new(Mutex::new(Vec::new()));
        let b = bytes.clone();
        let (addr, conns) = spawn_backend(move |s| serve_recorded(s, name, &b));
        Recorder { addr, bytes, conns }
    }

    fn seen(&self) -> String {
        String::from_utf8_lossy(&self.bytes.lock().unwrap()).into_owned()
    }
}

fn serve_recorded(mut s: TcpStream, name: &str, log: &Mutex<Vec<u8>>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        while let Some((head, whole)) = whole_request(&buf) {
            let rest = buf.split_off(whole);
            log.lock().unwrap().extend_from_slice(&buf);
            buf = rest;
            let path = head.split(' ').nth(1).unwrap_or("");
            if path == "/ws" {
                let _ = s.write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
                );
                let _ = s.write_all(&buf);
                loop {
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            let _ = s.write_all(&chunk[..n]);
                        }
                    }
                }
            }
            if path == "/slow" {
                thread::sleep(Duration::from_secs(5));
                return;
            }
            let body = format!("{name} {path}");
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Echo-Head: {}\r\n\r\n{body}",
                body.len(),
                head.len()
            );
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn route(pm: &Portmux, spec: &str, backends: &[SocketAddr]) {
    let list: Vec<String> = backends.iter().map(ToString::to_string).collect();
    let (ok, _, err) = portmux_cli(pm, &["route", "add", spec, "--backend", &list.join(",")]);
    assert!(ok, "{spec}: {err}");
}

fn request(s: &mut TcpStream, path: &str) -> Response {
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    read_response(s).unwrap()
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

#[test]
fn each_request_of_a_keep_alive_connection_is_routed_by_its_path() {
    // One worker: backend connections are pooled per worker thread.
    let pm = Portmux::start(&["--workers", "1"]);
    let port = free_port();
    let (a, b) = (Recorder::start("A"), Recorder::start("B"));
    route(&pm, &format!("http://:{port}/a"), &[a.addr]);
    route(&pm, &format!("http://:{port}/b"), &[b.addr]);
    let mut s = connect(port);
    let bodies: Vec<String> = ["/a/1", "/b/2", "/a/3"].iter().map(|p| request(&mut s, p).body).collect();
    assert_eq!(bodies, ["A /a/1", "B /b/2", "A /a/3"]);
    // Pipelined: three requests in one write, answered in order.
    s.write_all(
        b"GET /b/4 HTTP/1.1\r\nHost: x\r\n\r\nGET /a/5 HTTP/1.1\r\nHost: x\r\n\r\nGET /b/6 HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .unwrap();
    let bodies: Vec<String> = (0..3).map(|_| read_response(&mut s).unwrap().body).collect();
    assert_eq!(bodies, ["B /b/4", "A /a/5", "B /b/6"]);
    assert_eq!(request(&mut s, "/c").status, 404, "no route: answered, and the connection stays");
    assert_eq!(request(&mut s, "/a/7").body, "A /a/7");
    // One client connection, and one pooled connection per backend.
    assert_eq!((a.conns.load(Ordering::Relaxed), b.conns.load(Ordering::Relaxed)), (1, 1));
    for _ in 0..20 {
        assert_eq!(get(port, "x", "/a/new").unwrap().body, "A /a/new");
    }
    assert_eq!(a.conns.load(Ordering::Relaxed), 1, "new clients reuse the pooled backend connection");
}

#[test]
fn services_sharing_a_host_by_path_get_each_request_of_a_connection() {
    let pm = Portmux::start(&[]);
    let port = free_port();
    let _a = Service::hello(&pm, &format!("http://:{port}/a"), "service A", &["--name", "a"]);
    let _b = Service::hello(&pm, &format!("http://:{port}/b"), "service B", &["--name", "b"]);
    let mut s = connect(port);
    let bodies: Vec<String> = ["/a/", "/b/", "/a/"].iter().map(|p| request(&mut s, p).body).collect();
    assert_eq!(bodies, ["service A", "service B", "service A"]);
    for _ in 0..5 {
        assert_eq!(request(&mut s, "/b/x").body, "service B");
    }
}

#[test]
fn a_smuggled_second_request_is_refused_and_the_backend_sees_none_of_it() {
    let pm = Portmux::start(&[]);
    let port = free_port();
    let rec = Recorder::start("R");
    route(&pm, &format!("http://smug.test:{port}"), &[rec.addr]);
    let mut s = connect(port);
    write!(s, "GET /first HTTP/1.1\r\nHost: smug.test\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut s).unwrap().body, "R /first");
    s.write_all(b"POST /second HTTP/1.1\r\nHost: smug.test\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: smug.test\r\n\r\n").unwrap();
    let r = read_response(&mut s).unwrap();
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.body.contains("smuggling"), "a short text says why: {r:?}");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "then the connection closes");
    let seen = rec.seen();
    assert!(seen.contains("/first") && !seen.contains("/second") && !seen.contains("/smuggled"), "{seen}");

    // A second request naming another Host is routed by its own Host.
    let other = Recorder::start("O");
    route(&pm, &format!("http://other.test:{port}"), &[other.addr]);
    let mut s = connect(port);
    write!(s, "GET /1 HTTP/1.1\r\nHost: smug.test\r\n\r\nGET /2 HTTP/1.1\r\nHost: other.test\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut s).unwrap().body, "R /1");
    assert_eq!(read_response(&mut s).unwrap().body, "O /2");
}

#[derive(serde::Deserialize)]
struct Case {
    id: String,
    name: String,
    tier: String,
    request_b64: String,
}

fn base64(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let digits: Vec<u8> = s.bytes().filter(|&c| c != b'=').map(val).collect();
    digits
        .chunks(4)
        .flat_map(|c| {
            let n = c.iter().enumerate().fold(0u32, |n, (i, &d)| n | u32::from(d) << (18 - 6 * i));
            let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
            bytes[..c.len() - 1].to_vec()
        })
        .collect()
}

#[test]
fn every_severe_or_ambiguous_case_of_http_desync_guardian_is_refused() {
    let cases: Vec<Case> = serde_json::from_str(include_str!("fixtures/desync.json")).unwrap();
    assert!(cases.len() > 100, "the corpus is there: {}", cases.len());
    let pm = Portmux::start(&[]);
    let port = free_port();
    let rec = Recorder::start("R");
    // Both the first request of a connection (decided on the peek) and a later one.
    route(&pm, &format!("http://:{port}"), &[rec.addr]);
    let mut refused = std::collections::BTreeMap::<u16, usize>::new();
    let mut passed = Vec::new();
    for case in &cases {
        let raw = base64(&case.request_b64);
        for later in [false, true] {
            let before = rec.bytes.lock().unwrap().len();
            let mut s = connect(port);
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            if later {
                write!(s, "GET /before HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
                assert_eq!(read_response(&mut s).unwrap().body, "R /before", "{}", case.id);
            }
            s.write_all(&raw).unwrap();
            let _ = s.shutdown(std::net::Shutdown::Write);
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out);
            let text = String::from_utf8_lossy(&out);
            let status: u16 = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
            if !(matches!(status, 400 | 431) || out.is_empty()) {
                passed.push(format!("{} ({}, {}) later={later}: {text:?}", case.id, case.name, case.tier));
                continue;
            }
            *refused.entry(status).or_default() += 1;
            let seen = rec.bytes.lock().unwrap()[before..].to_vec();
            let expected: &[u8] = if later { b"GET /before HTTP/1.1\r\nhost: x\r\n" } else { b"" };
            assert!(
                seen.is_empty()
                    || (later && seen.starts_with(b"GET /before") && !seen.windows(8).any(|w| w == b"/foo/bar")),
                "{} ({}): the backend saw {:?} (expected at most {:?})",
                case.id,
                case.name,
                String::from_utf8_lossy(&seen),
                String::from_utf8_lossy(expected)
            );
        }
        assert_eq!(get(port, "x", "/after").unwrap().body, "R /after", "{}: a fresh connection is served", case.id);
    }
    assert!(passed.is_empty(), "{} cases were not refused:\n{}", passed.len(), passed.join("\n"));
    eprintln!("refused: {refused:?}");
}

#[test]
fn a_websocket_upgrade_becomes_a_relay_after_101() {
    let pm = Portmux::start(&[]);
    let port = free_port();
    let rec = Recorder::start("W");
    route(&pm, &format!("http://:{port}"), &[rec.addr]);
    let mut s = connect(port);
    assert_eq!(request(&mut s, "/plain").body, "W /plain");
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "{:?}", String::from_utf8_lossy(&head));
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101") && head.contains("upgrade: websocket"), "{head}");
    for msg in [&b"\x81\x05hello"[..], b"not http at all\r\n\r\n", &[0u8; 3000]] {
        s.write_all(msg).unwrap();
        let mut back = vec![0u8; msg.len()];
        s.read_exact(&mut back).unwrap();
        assert_eq!(back, msg, "echoed byte for byte");
    }
}

#[test]
fn headers_are_forwarded_and_hop_by_hop_fields_removed() {
    let pm = Portmux::start(&["--via"]);
    let port = free_port();
    let rec = Recorder::start("H");
    route(&pm, &format!("http://:{port}"), &[rec.addr]);
    let mut s = connect(port);
    s.write_all(b"GET /h HTTP/1.1\r\nHost: Web.Test:8080\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\nX-Forwarded-For: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\n\r\n").unwrap();
    let r = read_response(&mut s).unwrap();
    assert!(r.head.to_ascii_lowercase().contains("via: 1.1 portmux"), "{}", r.head);
    let seen = rec.seen().to_ascii_lowercase();
    assert!(seen.contains("x-forwarded-for: 127.0.0.1\r\n"), "an untrusted chain is replaced: {seen}");
    assert!(seen.contains("x-forwarded-proto: http\r\n"), "{seen}");
    assert!(seen.contains("x-forwarded-host: web.test:8080\r\n"), "the host as asked, port included: {seen}");
    assert!(seen.contains("forwarded: for=127.0.0.1;proto=http;host=\"web.test:8080\"\r\n"), "{seen}");
    assert!(seen.contains("via: 1.1 portmux"), "{seen}");
    for gone in ["x-secret", "keep-alive", "6.6.6.6", "connection:"] {
        assert!(!seen.contains(gone), "{gone} is not forwarded: {seen}");
    }
    // ?forwarded=off adds nothing; a trusted proxy's chain is kept.
    let port2 = free_port();
    route(&pm, &format!("http://:{port2}?forwarded=off"), &[rec.addr]);
    let before = rec.seen().len();
    let mut s = connect(port2);
    s.write_all(b"GET /off HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n").unwrap();
    read_response(&mut s).unwrap();
    let seen = rec.seen()[before..].to_ascii_lowercase();
    assert!(seen.contains("x-forwarded-for: 6.6.6.6\r\n") && !seen.contains("forwarded: for"), "{seen}");
    let pm = Portmux::start(&["--trusted-proxies", "127.0.0.0/8"]);
    let port3 = free_port();
    route(&pm, &format!("http://:{port3}"), &[rec.addr]);
    let before = rec.seen().len();
    let mut s = connect(port3);
    s.write_all(b"GET /t HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n").unwrap();
    read_response(&mut s).unwrap();
    let seen = rec.seen()[before..].to_ascii_lowercase();
    assert!(seen.contains("x-forwarded-for: 6.6.6.6, 127.0.0.1\r\n"), "{seen}");
}

#[test]
fn per_request_errors_are_answered_and_the_connection_stays_usable() {
    let pm = Portmux::start(&["--response-timeout", "1s", "--max-request-body", "10", "--peek-max", "4096"]);
    let port = free_port();
    let rec = Recorder::start("E");
    let dead = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap(); // Closed at once: refused.
    route(&pm, &format!("http://:{port}/ok"), &[rec.addr]);
    route(&pm, &format!("http://:{port}/slow"), &[rec.addr]);
    route(&pm, &format!("http://:{port}/dead"), &[dead]);
    let mut s = connect(port);
    let r = request(&mut s, "/dead");
    assert!(r.status == 502 && r.body.starts_with("portmux: "), "{r:?}");
    assert_eq!(request(&mut s, "/ok").body, "E /ok", "usable after a 502");
    let started = Instant::now();
    let r = request(&mut s, "/slow");
    assert!(r.status == 504 && r.body.contains("--response-timeout"), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
    assert_eq!(request(&mut s, "/ok").body, "E /ok", "usable after a 504");
    write!(s, "POST /ok HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello world").unwrap();
    let r = read_response(&mut s).unwrap();
    assert!(r.status == 413 && r.body.contains("--max-request-body"), "{r:?}");
    write!(s, "POST /ok HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello").unwrap();
    assert_eq!(read_response(&mut s).unwrap().body, "E /ok", "usable after a 413");
    // A fault in a chunked body after its first chunk went on: that exchange
    // fails (one answer), and the connection closes; no second answer.
    let mut c = connect(port);
    c.write_all(b"POST /ok/chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n").unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    while !rec.seen().contains("/ok/chunked") {
        assert!(Instant::now() < until, "the head went on to the backend");
        thread::sleep(Duration::from_millis(5));
    }
    c.write_all(b"zz\r\n").unwrap();
    let mut all = Vec::new();
    let _ = c.read_to_end(&mut all);
    let text = String::from_utf8_lossy(&all);
    assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{text}");
    // Over the header limit (a later request): 431, then the connection closes.
    write!(s, "GET /ok HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "b".repeat(8000)).unwrap();
    let r = read_response(&mut s).unwrap();
    assert_eq!(r.status, 431, "{r:?}");
    assert!(!rec.seen().contains("X-Big") && !rec.seen().contains("x-big"));
}

#[test]
fn keep_alive_clients_make_requests_across_portmux_upgrades_on_one_connection() {
    let mut pm = Portmux::start(&[]);
    let port = free_port();
    let rec = Recorder::start("U");
    route(&pm, &format!("http://:{port}/u"), &[rec.addr]);
    let mut clients: Vec<TcpStream> = (0..5).map(|_| connect(port)).collect();
    for round in 0..4 {
        for (i, s) in clients.iter_mut().enumerate() {
            let path = format!("/u/{round}/{i}");
            let r = request(s, &path);
            assert_eq!(r.body, format!("U {path}"), "round {round}, client {i}: {}", pm.log());
        }
        let old = pm.pid();
        pm.upgrade(&[]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(old) {
            assert!(Instant::now() < deadline, "the old process exits at once: nothing is left to drain");
            thread::sleep(Duration::from_millis(20));
        }
        // The new process holds the very same five connections, waiting for their next request.
        pm.wait_for("the five client connections held by the new process", |pm| pm.status().idle == 5);
    }
    // Each client kept its one connection: a close between requests would
    // have failed the next request on it.
    for s in &mut clients {
        assert_eq!(request(s, "/u/end").body, "U /u/end");
    }
}

#[test]
fn http2_over_tls_serves_several_streams_and_survives_floods() {
    let dir = TempDir::new();
    let pki = Pki::new(dir.path());
    let (cert, key) = pki.leaf("h2.test");
    let pm = Portmux::start(&["--cert-dir", dir.path().to_str().unwrap()]);
    let port = free_port();
    let (a, b) = (Recorder::start("A"), Recorder::start("B"));
    route(&pm, &format!("https://h2.test:{port}/a?cert={cert}&key={key}"), &[a.addr]);
    route(&pm, &format!("https://h2.test:{port}/b?cert={cert}&key={key}"), &[b.addr]);
    let url = |p: &str| format!("https://h2.test:{port}{p}");
    let resolve = format!("h2.test:{port}:127.0.0.1");
    let ca = pki.ca_pem.to_str().unwrap().to_string();
    let out = curl(&[
        "--http2",
        "--cacert",
        &ca,
        "--resolve",
        &resolve,
        "-w",
        " %{http_version} %{num_connects}\n",
        &url("/a/1"),
        &url("/b/2"),
        &url("/a/3"),
    ]);
    assert_eq!(out, "A /a/1 2 1\nB /b/2 2 0\nA /a/3 2 0\n", "three streams on one HTTP/2 connection");
    // HTTP/1.1 over the same routes (ALPN http/1.1).
    let out = curl(&["--http1.1", "--cacert", &ca, "--resolve", &resolve, "-w", " %{http_version}", &url("/b/x")]);
    assert_eq!(out, "B /b/x 1.1");

    let flood = |frames: &dyn Fn(&mut Vec<u8>)| {
        let mut cfg = (*pki.client_config()).clone();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let name = rustls::pki_types::ServerName::try_from("h2.test").unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
        let mut sock = connect(port);
        let mut tls = rustls::Stream::new(&mut conn, &mut sock);
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        frame(&mut out, 4, 0, 0, &[]); // SETTINGS
        frames(&mut out);
        let sent = tls.write_all(&out).and_then(|()| tls.flush());
        let mut back = Vec::new();
        let started = Instant::now();
        let mut buf = [0u8; 16384];
        let mut ended = false;
        while started.elapsed() < Duration::from_secs(10) {
            match tls.read(&mut buf) {
                Ok(0) | Err(_) => {
                    ended = true;
                    break;
                }
                Ok(n) => back.extend_from_slice(&buf[..n]),
            }
        }
        (ended || sent.is_err(), goaway(&back))
    };
    // Rapid reset (CVE-2023-44487): streams opened and cancelled at once.
    let (ended, code) = flood(&|out| {
        for i in 0..5000u32 {
            let id = 2 * i + 1;
            frame(out, 1, 0x5, id, &headers_block());
            frame(out, 3, 0, id, &8u32.to_be_bytes()); // RST_STREAM CANCEL
        }
    });
    // GOAWAY ENHANCE_YOUR_CALM, unless the close overtook it (we were still writing).
    assert!(code == Some(0xb) || (code.is_none() && ended), "a rapid-reset flood ends its connection: {code:?}");
    // CONTINUATION flood: a header block that never ends.
    let (ended, _) = flood(&|out| {
        frame(out, 1, 0x0, 1, &headers_block());
        for i in 0..20_000u32 {
            let mut junk = vec![0x00, 0x05];
            junk.extend_from_slice(format!("x{:04}", i % 10_000).as_bytes());
            junk.push(0x7f);
            junk.push(0x40);
            junk.extend_from_slice(&[b'v'; 0x7f + 0x40]);
            frame(out, 9, 0, 1, &junk);
        }
    });
    assert!(ended, "a CONTINUATION flood ends its connection");
    // A Host header that names another host than :authority (RFC 9113 §8.3.1): 400.
    let mut cfg = (*pki.client_config()).clone();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let name = rustls::pki_types::ServerName::try_from("h2.test").unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let mut sock = connect(port);
    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut out, 4, 0, 0, &[]);
    let mut block = headers_block();
    block.extend_from_slice(&[0x0f, 0x17, 10]); // host (static 38), literal, not indexed
    block.extend_from_slice(b"admin.test");
    frame(&mut out, 1, 0x5, 1, &block);
    tls.write_all(&out).unwrap();
    let mut back = Vec::new();
    let mut buf = [0u8; 4096];
    let status = loop {
        let n = tls.read(&mut buf).unwrap();
        assert!(n > 0, "an answer comes");
        back.extend_from_slice(&buf[..n]);
        if let Some(first) = response_headers(&back, 1) {
            break first;
        }
    };
    assert_eq!(status, 0x8c, ":status 400 (HPACK static index 12)");
    let out = curl(&["--http2", "--cacert", &ca, "--resolve", &resolve, &url("/a/after")]);
    assert_eq!(out, "A /a/after", "others are still served");
}

/// Appends an HTTP/2 frame.
fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// GET https://h2.test/a/ in HPACK (static table entries, literal authority).
fn headers_block() -> Vec<u8> {
    let mut b = vec![0x82, 0x87, 0x04, 0x03];
    b.extend_from_slice(b"/a/");
    b.extend_from_slice(&[0x01, 0x07]);
    b.extend_from_slice(b"h2.test");
    b
}

/// The first byte of the header block of the HEADERS frame on `stream`, once it is in `bytes`.
fn response_headers(bytes: &[u8], stream: u32) -> Option<u8> {
    let mut i = 0;
    while i + 9 <= bytes.len() {
        let len = u32::from_be_bytes([0, bytes[i], bytes[i + 1], bytes[i + 2]]) as usize;
        let id = u32::from_be_bytes([bytes[i + 5], bytes[i + 6], bytes[i + 7], bytes[i + 8]]) & 0x7fff_ffff;
        if bytes[i + 3] == 1 && id == stream && i + 10 <= bytes.len() {
            return Some(bytes[i + 9]);
        }
        i += 9 + len;
    }
    None
}

/// The error code of the first GOAWAY frame in `bytes`, if there is one.
fn goaway(bytes: &[u8]) -> Option<u32> {
    let mut i = 0;
    while i + 9 <= bytes.len() {
        let len = u32::from_be_bytes([0, bytes[i], bytes[i + 1], bytes[i + 2]]) as usize;
        if bytes[i + 3] == 7 && i + 9 + 8 <= bytes.len() {
            let p = &bytes[i + 9..];
            return Some(u32::from_be_bytes([p[4], p[5], p[6], p[7]]));
        }
        i += 9 + len;
    }
    None
}

/// An HTTP/2 backend (prior knowledge) that answers with its name, the
/// path and the version it was asked with; counts its connections.
fn h2_backend(name: &'static str) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let counted = conns.clone();
    thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            while let Ok((s, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| async move {
                            let body = format!("{name} {} {:?}", req.uri().path(), req.version());
                            let body = http_body_util::Full::new(bytes::Bytes::from(body));
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(body))
                        });
                    let exec = hyper_util::rt::TokioExecutor::new();
                    let io = hyper_util::rt::TokioIo::new(s);
                    let _ = hyper::server::conn::http2::Builder::new(exec).serve_connection(io, svc).await;
                });
            }
        });
    });
    (addr, conns)
}

#[test]
fn a_backend_that_asks_for_http2_gets_one_multiplexed_connection() {
    let pm = Portmux::start(&["--workers", "1"]);
    let port = free_port();
    let (h2, conns) = h2_backend("H2");
    route(&pm, &format!("http://:{port}/h2?backend_proto=h2"), &[h2]);
    let mut s = connect(port);
    for i in 0..5 {
        assert_eq!(request(&mut s, &format!("/h2/{i}")).body, format!("H2 /h2/{i} HTTP/2.0"));
    }
    for _ in 0..5 {
        assert_eq!(get(port, "x", "/h2/new").unwrap().body, "H2 /h2/new HTTP/2.0");
    }
    assert_eq!(conns.load(Ordering::Relaxed), 1, "every request shares one HTTP/2 connection");
}

#[test]
fn services_sharing_an_https_host_by_path_get_each_request_after_termination() {
    let dir = TempDir::new();
    let pki = Pki::new(dir.path());
    let (cert, key) = pki.leaf("s.test");
    let pm = Portmux::start(&["--cert-dir", dir.path().to_str().unwrap()]);
    let port = free_port();
    let spec = |path: &str| format!("https://s.test:{port}{path}?cert={cert}&key={key}");
    let _a = Service::hello(&pm, &spec("/a"), "service A", &["--name", "a"]);
    let _b = Service::hello(&pm, &spec("/b"), "service B", &["--name", "b"]);
    let name = rustls::pki_types::ServerName::try_from("s.test").unwrap();
    let mut conn = rustls::ClientConnection::new(pki.client_config(), name).unwrap();
    let mut sock = connect(port);
    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    for (path, body) in [("/a/1", "service A"), ("/b/2", "service B"), ("/a/3", "service A")] {
        write!(tls, "GET {path} HTTP/1.1\r\nHost: s.test\r\n\r\n").unwrap();
        let r = read_response(&mut tls).unwrap();
        assert_eq!(r.body, body, "{path}");
        assert!(r.head.contains("x-portmux-tls: "), "the service learns the TLS facts: {}", r.head);
    }
    write!(tls, "GET /a/4 HTTP/1.1\r\nHost: other.test\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut tls).unwrap().status, 421, "a Host other than the SNI");
}
