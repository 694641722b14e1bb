//! The engine's direct path (plain HTTP/1.1 to backends, without hyper)
//! through the real binary, against a backend that answers each path with
//! exactly the bytes a test gives: every response framing arrives framed as
//! sent (lengths, chunks with trailers, HEAD, 1xx, 204, the end of the
//! connection), ambiguous or broken responses become 502 and never reach
//! the client, a connection with bytes after its response is not reused,
//! and a kept-alive connection the backend closes under a request is tried
//! again only when the request may be sent twice.

use crate::util::*;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the scripted backend does with a request.
enum Act {
    /// Write these bytes; the connection stays open.
    Send(&'static [u8]),
    /// Write these bytes and close.
    SendClose(&'static [u8]),
    /// Close without a word.
    Drop,
}

/// A backend whose answers come from `script(path, nth request on this connection)`.
struct Scripted {
    addr: SocketAddr,
    conns: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Scripted {
    fn start(script: fn(&str, usize) -> Act) -> Scripted {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let (addr, conns) = spawn_backend(move |stream| serve(stream, script, &s));
        Scripted { addr, conns, seen }
    }

    fn conns(&self) -> usize {
        self.conns.load(Ordering::Relaxed)
    }
}

fn serve(mut s: TcpStream, script: fn(&str, usize) -> Act, seen: &Mutex<Vec<String>>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut nth = 0;
    loop {
        while let Some((head, whole)) = whole_request(&buf) {
            buf.drain(..whole);
            let path = head.split(' ').nth(1).unwrap_or("").to_string();
            seen.lock().unwrap().push(path.clone());
            nth += 1;
            match script(&path, nth) {
                Act::Send(bytes) => {
                    let _ = s.write_all(bytes);
                }
                Act::SendClose(bytes) => {
                    let _ = s.write_all(bytes);
                    return;
                }
                Act::Drop => return,
            }
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn portmux_with(backend: &Scripted) -> (Portmux, u16) {
    let pm = Portmux::start(&["--workers", "1"]);
    let port = free_port();
    let spec = format!("http://:{port}");
    let (ok, _, err) = portmux_cli(&pm, &["route", "add", &spec, "--backend", &backend.addr.to_string()]);
    assert!(ok, "{err}");
    (pm, port)
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// Reads a response head (through its empty line).
fn head(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "closed after {:?}", String::from_utf8_lossy(&buf));
        buf.push(byte[0]);
    }
    String::from_utf8(buf).unwrap()
}

fn bytes(s: &mut TcpStream, n: usize) -> String {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).unwrap();
    String::from_utf8(buf).unwrap()
}

fn ask(s: &mut TcpStream, method: &str, path: &str) -> String {
    write!(s, "{method} {path} HTTP/1.1\r\nHost: direct.test\r\n\r\n").unwrap();
    head(s)
}

/// 1 MiB of body, framed by length and in 4 KiB chunks: many reads on each side.
fn big(chunked: bool) -> &'static [u8] {
    static BIG: std::sync::OnceLock<(Vec<u8>, Vec<u8>)> = std::sync::OnceLock::new();
    let (len, chunks) = BIG.get_or_init(|| {
        let body: Vec<u8> = (0..1 << 20).map(|i| b'a' + (i % 26) as u8).collect();
        let mut len = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
        len.extend_from_slice(&body);
        let mut chunks = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        for piece in body.chunks(4096) {
            chunks.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
            chunks.extend_from_slice(piece);
            chunks.extend_from_slice(b"\r\n");
        }
        chunks.extend_from_slice(b"0\r\n\r\n");
        (len, chunks)
    });
    if chunked { chunks } else { len }
}

fn framings(path: &str, _: usize) -> Act {
    Act::Send(match path {
        "/big" => big(false),
        "/big-chunked" => big(true),
        "/len" => b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Hop: 1\r\nConnection: x-hop\r\nKeep-Alive: 5\r\n\r\nabc",
        "/chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\nT: v\r\n\r\n",
        "/head" => b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n",
        "/early" => b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        "/empty" => b"HTTP/1.1 204 No Content\r\n\r\n",
        "/close" => return Act::SendClose(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end"),
        _ => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
    })
}

#[test]
fn every_response_framing_reaches_the_client_as_framed() {
    let backend = Scripted::start(framings);
    let (_pm, port) = portmux_with(&backend);
    let mut s = connect(port);

    let h = ask(&mut s, "GET", "/len");
    assert!(h.starts_with("HTTP/1.1 200 OK\r\n") && h.contains("Content-Length: 3\r\n"), "{h}");
    for gone in ["X-Hop", "Connection", "Keep-Alive"] {
        assert!(!h.contains(gone), "hop-by-hop {gone} removed: {h}");
    }
    assert_eq!(bytes(&mut s, 3), "abc");

    let h = ask(&mut s, "GET", "/chunked");
    assert!(h.contains("Transfer-Encoding: chunked\r\n") && !h.contains("Content-Length"), "{h}");
    let chunks = "3;x=y\r\nabc\r\n0\r\nT: v\r\n\r\n";
    assert_eq!(bytes(&mut s, chunks.len()), chunks, "chunks and trailers pass as sent");

    let h = ask(&mut s, "HEAD", "/head");
    assert!(h.contains("Content-Length: 9\r\n"), "HEAD keeps the length of the full answer: {h}");

    let h = ask(&mut s, "GET", "/early");
    assert!(h.starts_with("HTTP/1.1 200 OK\r\n") && !h.contains("103"), "informational answers are skipped: {h}");
    assert_eq!(bytes(&mut s, 2), "ok");

    let h = ask(&mut s, "GET", "/empty");
    assert!(h.starts_with("HTTP/1.1 204 "), "{h}");

    for (path, chunked) in [("/big", false), ("/big-chunked", true)] {
        let whole = big(chunked);
        let sent_head = whole.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        let h = ask(&mut s, "GET", path);
        assert!(h.contains(if chunked { "Transfer-Encoding: chunked" } else { "Content-Length: 1048576" }), "{h}");
        let body = bytes(&mut s, whole.len() - sent_head);
        assert!(body.as_bytes() == &whole[sent_head..], "{path}: every byte, in order");
    }

    // Each answer ended where it ended: everything so far came on one
    // client connection and one backend connection.
    assert_eq!(backend.conns(), 1);

    let h = ask(&mut s, "GET", "/close");
    assert!(h.contains("Connection: close\r\n"), "a body that ends with the connection ends the client's: {h}");
    let mut rest = String::new();
    s.read_to_string(&mut rest).unwrap();
    assert_eq!(rest, "until the end");
    let seen = backend.seen.lock().unwrap().clone();
    assert_eq!(seen, ["/len", "/chunked", "/head", "/early", "/empty", "/big", "/big-chunked", "/close"]);
}

fn broken(path: &str, _: usize) -> Act {
    Act::Send(match path {
        "/coding" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nxyz",
        "/both" => b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        "/lengths" => b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        "/chunk" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
        "/switch" => b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        "/head" => b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Broken head\r\n\r\nabc",
        "/extra" => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nforged",
        _ => b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nfine",
    })
}

#[test]
fn ambiguous_or_broken_responses_are_bad_gateway_and_never_reach_the_client() {
    let backend = Scripted::start(broken);
    let (_pm, port) = portmux_with(&backend);
    let mut s = connect(port);
    for path in ["/coding", "/both", "/lengths", "/chunk", "/switch", "/head"] {
        let r = {
            write!(s, "GET {path} HTTP/1.1\r\nHost: direct.test\r\n\r\n").unwrap();
            read_response(&mut s).unwrap()
        };
        assert_eq!(r.status, 502, "{path}: {r:?}");
        assert!(r.body.starts_with("portmux: ") && r.body.contains("failed"), "{path}: {r:?}");
        for leaked in ["xyz", "abc", "Upgrade", "X-Broken"] {
            assert!(!r.head.contains(leaked) && !r.body.contains(leaked), "{path}: {leaked} reached the client");
        }
        // The client's connection stays usable.
        let h = ask(&mut s, "GET", "/fine");
        assert!(h.starts_with("HTTP/1.1 200 "), "{path}: {h}");
        assert_eq!(bytes(&mut s, 4), "fine");
    }
    // A response followed by more bytes: the client gets the response, and
    // the bytes after it (a second, forged answer) go nowhere: that backend
    // connection is not used again.
    let before = backend.conns();
    let h = ask(&mut s, "GET", "/extra");
    assert!(h.contains("Content-Length: 2\r\n"), "{h}");
    assert_eq!(bytes(&mut s, 2), "ok");
    let h = ask(&mut s, "GET", "/fine");
    assert!(h.starts_with("HTTP/1.1 200 "), "{h}");
    assert_eq!(bytes(&mut s, 4), "fine", "not the forged answer");
    assert_eq!(backend.conns(), before + 1, "a new backend connection for the request after /extra");
}

/// Answers the first request of each connection; closes under the second.
fn one_per_connection(_: &str, nth: usize) -> Act {
    if nth == 1 { Act::Send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok") } else { Act::Drop }
}

#[test]
fn a_kept_alive_backend_connection_closed_under_a_request_is_retried_only_when_safe() {
    let backend = Scripted::start(one_per_connection);
    let (_pm, port) = portmux_with(&backend);
    let mut s = connect(port);
    for i in 0..3 {
        let h = ask(&mut s, "GET", &format!("/get/{i}"));
        assert!(h.starts_with("HTTP/1.1 200 "), "GET {i}: {h}");
        assert_eq!(bytes(&mut s, 2), "ok");
    }
    // The second and third GET each met a closed kept-alive connection and went again on a new one.
    assert_eq!(backend.conns(), 3);
    let seen = backend.seen.lock().unwrap().clone();
    assert_eq!(seen, ["/get/0", "/get/1", "/get/1", "/get/2", "/get/2"]);
    // A POST that reached a backend is never sent twice: 502.
    write!(s, "POST /post HTTP/1.1\r\nHost: direct.test\r\nContent-Length: 4\r\n\r\nbody").unwrap();
    let r = read_response(&mut s).unwrap();
    assert_eq!(r.status, 502, "{r:?}");
    let posts = backend.seen.lock().unwrap().iter().filter(|p| *p == "/post").count();
    assert_eq!(posts, 1, "the POST went out once");
}
