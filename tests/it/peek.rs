//! Peeking at clients: split heads route correctly, silent and slow clients
//! are cut at the deadline, garbage gets a clear answer, and portmux keeps
//! serving everyone else, even out of file descriptors.

use crate::util::*;
use std::io::Write;
use std::net::Shutdown;
use std::thread;
use std::time::{Duration, Instant};

#[test]
fn silent_and_slow_clients_are_closed_at_the_deadline_while_others_are_served() {
    let pm = Portmux::start(&["--peek-timeout", "1s"]);
    let port = free_port();
    let _svc = Service::hello(&pm, &format!("http://:{port}"), "served", &[]);
    let silent = thread::spawn(move || {
        let started = Instant::now();
        let mut c = client(port);
        let closed = read_until_close(&mut c);
        (started.elapsed(), closed)
    });
    let slow = thread::spawn(move || {
        let started = Instant::now();
        let mut c = client(port);
        // One byte every 100 ms: always sending, never finishing.
        for b in b"GET / HTTP/1.1\r\nHost: slow\r\nX-Padding: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa" {
            if c.write_all(&[*b]).is_err() {
                break;
            }
            thread::sleep(Duration::from_millis(100));
        }
        (started.elapsed(), read_until_close(&mut c))
    });
    for i in 0..20 {
        assert_eq!(get(port, "x", &format!("/{i}")).unwrap().body, "served");
    }
    let (took, closed) = silent.join().unwrap();
    assert!(closed.is_ok(), "a silent client gets a FIN: {closed:?}");
    assert!(took >= Duration::from_millis(800) && took < Duration::from_secs(4), "silent client closed after {took:?}");
    let (took, _) = slow.join().unwrap();
    assert!(took < Duration::from_secs(5), "the slow client was cut at the deadline, not served: {took:?}");
}

#[test]
fn heads_split_into_tiny_segments_and_records_are_routed() {
    let dir = TempDir::new();
    let pki = Pki::new(dir.path());
    let pm = Portmux::start(&[]);
    let (http_port, tls_port) = (free_port(), free_port());
    let _h = Service::hello(&pm, &format!("http://split.test:{http_port}/deep"), "http split", &[]);
    let (cert, key) = pki.leaf("a.example.test");
    let tls_args = ["--tls-cert", cert.as_str(), "--tls-key", key.as_str()];
    let _t = Service::hello(&pm, &format!("tls://a.example.test:{tls_port}"), "tls split", &tls_args);

    let mut c = client(http_port);
    c.set_nodelay(true).unwrap();
    for b in b"GET /deep/x HTTP/1.1\r\nHost: split.test\r\n\r\n" {
        c.write_all(&[*b]).unwrap();
        thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(read_response(&mut c).unwrap().body, "http split");

    // The ClientHello re-cut into many records, sent in small TCP segments;
    // the full handshake then completes end to end.
    for (record, segment) in [(40, 7), (300, 1), (1, 5)] {
        let r = tls_get(pki.client_config(), tls_port, "a.example.test", "/", Some((record, segment)));
        assert_eq!(r.unwrap().body, "tls split", "records of {record} bytes in segments of {segment}");
    }
}

#[test]
fn garbage_gets_a_clear_answer_and_everyone_else_is_served() {
    let pm = Portmux::start(&["--peek-max", "1024"]);
    let (http_port, tls_port) = (free_port(), free_port());
    let _h = Service::hello(&pm, &format!("http://:{http_port}"), "fine", &[]);
    let raw =
        portmux_client::Builder::new().route(format!("tls://t.test:{tls_port}")).control(pm.control()).bind().unwrap();

    let answer = |port, bytes: &[u8]| String::from_utf8_lossy(&raw_exchange(port, bytes)).into_owned();
    let cases: &[(&str, &[u8], &str)] = &[
        ("binary garbage", b"\x00\x01\x02garbage\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        ("no Host", b"GET / HTTP/1.1\r\n\r\n", "without a Host header"),
        (
            "smuggling",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "request-smuggling",
        ),
        ("two Hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "more than one Host"),
    ];
    for (what, bytes, want) in cases {
        let got = answer(http_port, bytes);
        assert!(got.starts_with("HTTP/1.1 400 ") && got.contains(want), "{what}: {got}");
    }
    let big = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(2000));
    assert!(answer(http_port, big.as_bytes()).starts_with("HTTP/1.1 431 "), "an oversized head gets 431");

    // TLS port: a malformed ClientHello gets a decode_error alert, plain HTTP a 400.
    assert_eq!(raw_exchange(tls_port, &[22, 3, 1, 0, 6, 2, 0, 0, 2, 0, 0]), [21, 3, 3, 0, 2, 2, 50]);
    let mut oversized = vec![22, 3, 1, 0x0f, 0xa0, 1, 0, 0x0f, 0x9c, 3, 3];
    oversized.resize(2000, 0);
    let mut c = client(tls_port);
    c.write_all(&oversized).unwrap();
    assert_eq!(read_until_close(&mut c), Ok(vec![21, 3, 3, 0, 2, 2, 50]), "a ClientHello over --peek-max");
    let plain = answer(tls_port, b"GET / HTTP/1.1\r\nHost: t.test\r\n\r\n");
    assert!(plain.starts_with("HTTP/1.1 400 ") && plain.contains("expects TLS"), "{plain}");
    // A truncated ClientHello followed by a hang-up is simply closed.
    let mut c = client(tls_port);
    c.write_all(&[22, 3, 1, 0, 200, 1, 0, 0, 196, 3, 3]).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    assert!(read_until_close(&mut c).is_ok_and(|b| b.is_empty()));

    assert_eq!(get(http_port, "x", "/").unwrap().body, "fine", "portmux keeps serving");
    drop(raw);
}

#[test]
fn portmux_keeps_serving_when_it_runs_out_of_file_descriptors() {
    let mut pm = Portmux::start_with_ulimit("-n 64", &["--peek-timeout", "2s"]);
    let port = free_port();
    let _svc = Service::hello(&pm, &format!("http://:{port}"), "still serving", &[]);
    // Far more idle clients than portmux has fds: the rest wait in the backlog.
    let idle: Vec<_> = (0..150).map(|_| client(port)).collect();
    assert!(pm.wait_log("cannot accept", Duration::from_secs(10)), "{}", pm.log());
    assert!(pm.log().contains("raise LimitNOFILE"), "the warning says what to do");
    drop(idle);
    let r = get(port, "x", "/").unwrap();
    assert_eq!(r.body, "still serving");
    assert!(pm.is_running());
}

/// Connections to `port` the kernel still holds as SYN_RECV (accepted by TCP,
/// not yet handed to portmux), from /proc/net/tcp{,6}.
fn held_by_the_kernel(port: u16) -> usize {
    let local = format!(":{port:04X} ");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .flat_map(|t| t.lines().skip(1).map(str::to_owned).collect::<Vec<_>>())
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && format!("{} ", &f[1][f[1].len() - 5..]) == local && f[3] == "03"
        })
        .count()
}

#[test]
fn client_first_ports_defer_accept_until_bytes_arrive_and_tcp_ports_do_not() {
    let pm = Portmux::start(&["--peek-timeout", "1s"]);
    let (http_port, tcp_port) = (free_port(), free_port());
    let _web = Service::hello(&pm, &format!("http://:{http_port}"), "deferred", &[]);
    let _raw = Service::hello(&pm, &format!("tcp://:{tcp_port}"), "raw", &[]);
    // A silent client of the HTTP port stays with the kernel: no worker wakes for it.
    let started = Instant::now();
    let mut silent = client(http_port);
    thread::sleep(Duration::from_millis(300));
    assert_eq!(held_by_the_kernel(http_port), 1, "TCP_DEFER_ACCEPT holds the silent connection");
    // A client that speaks is served at once.
    assert_eq!(get(http_port, "x", "/").unwrap().body, "deferred");
    // The silent one is accepted after about a second and closed at the peek deadline.
    assert!(read_until_close(&mut silent).is_ok());
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1500) && took < Duration::from_secs(5), "closed after {took:?}");

    // A tcp:// port is not deferred: a server-speaks-first service gets the
    // connection at once (hello answers HTTP, so ask it; portmux itself must not wait).
    let _silent_raw = client(tcp_port);
    thread::sleep(Duration::from_millis(300));
    assert_eq!(held_by_the_kernel(tcp_port), 0, "a tcp:// port hands connections over without waiting");
    assert_eq!(get(tcp_port, "x", "/").unwrap().body, "raw");
    drop(silent);
}
