//! Zero-downtime upgrades through the real binary: twenty upgrades under load
//! with no error at all, long-lived streams byte-exact across them, a failing
//! new binary, SIGUSR2, and processes and fds back to baseline.

use crate::util::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// What one load thread saw.
#[derive(Debug, Default)]
struct Stats {
    ok: u64,
    errors: u64,
    first_errors: Vec<String>,
}

impl Stats {
    fn error(&mut self, what: String) {
        self.errors += 1;
        if self.first_errors.len() < 5 {
            self.first_errors.push(what);
        }
    }
}

/// A bounded load generator: requests on `port` until `stop` (or 100 000
/// requests), with keep-alive or a new connection each; every connect, write,
/// read or status error is counted.
fn load(port: u16, body: &'static str, keep_alive: bool, stop: Arc<AtomicBool>) -> JoinHandle<Stats> {
    thread::spawn(move || {
        let mut stats = Stats::default();
        let mut conn: Option<TcpStream> = None;
        let request = if keep_alive {
            "GET / HTTP/1.1\r\nHost: load\r\n\r\n"
        } else {
            "GET / HTTP/1.1\r\nHost: load\r\nConnection: close\r\n\r\n"
        };
        while !stop.load(Ordering::Relaxed) && stats.ok + stats.errors < 100_000 {
            if conn.is_none() {
                match TcpStream::connect(("127.0.0.1", port)) {
                    Ok(s) => {
                        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                        conn = Some(s);
                    }
                    Err(e) => {
                        stats.error(format!("connect: {e}"));
                        continue;
                    }
                }
            }
            let Some(s) = conn.as_mut() else { continue };
            if let Err(e) = s.write_all(request.as_bytes()) {
                stats.error(format!("write: {e}"));
                conn = None;
                continue;
            }
            let port = s.local_addr().map(|a| a.port()).unwrap_or(0);
            match read_response(s) {
                Ok(r) if r.status == 200 && r.body == body => stats.ok += 1,
                Ok(r) => stats.error(format!("status {} body {:?}", r.status, r.body)),
                Err(e) => {
                    stats.error(format!("read (client port {port}): {e}"));
                    conn = None;
                    continue;
                }
            }
            if !keep_alive {
                conn = None;
            }
        }
        stats
    })
}

#[test]
fn twenty_upgrades_under_load_lose_nothing() {
    let mut pm = Portmux::start(&["--drain", "10s"]);
    let (handoff, forward) = (free_port(), free_port());
    let _svc = Service::hello(&pm, &format!("http://:{handoff}"), "svc", &[]);
    let (_backend, backend) = Service::backend("fwd", &[]);
    assert!(portmux_cli(&pm, &["route", "add", &format!("http://:{forward}"), "--backend", &backend.to_string()]).0);
    assert_eq!(get(handoff, "x", "/").unwrap().body, "svc");
    assert_eq!(get(forward, "x", "/").unwrap().body, "fwd");
    let baseline = fd_count(pm.pid());

    let stop = Arc::new(AtomicBool::new(false));
    let loads: Vec<(&str, JoinHandle<Stats>)> = vec![
        ("handoff, keep-alive", load(handoff, "svc", true, stop.clone())),
        ("handoff, new connection per request", load(handoff, "svc", false, stop.clone())),
        ("forward, keep-alive", load(forward, "fwd", true, stop.clone())),
        ("forward, keep-alive (2)", load(forward, "fwd", true, stop.clone())),
        ("forward, new connection per request", load(forward, "fwd", false, stop.clone())),
    ];
    thread::sleep(Duration::from_millis(300));
    let mut old = Vec::new();
    for i in 0..20 {
        old.push(pm.pid());
        let pid = pm.upgrade(&[]).unwrap_or_else(|e| panic!("upgrade {i}: {e}\n{}", pm.log()));
        assert!(alive(pid));
        thread::sleep(Duration::from_millis(100));
    }
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    for (what, handle) in loads {
        let stats = handle.join().unwrap();
        let log = pm.log();
        let port = stats
            .first_errors
            .first()
            .and_then(|e| e.split("client port ").nth(1))
            .and_then(|r| r.split(')').next())
            .unwrap_or("none");
        let notes: Vec<&str> = log
            .lines()
            .filter(|l| {
                l.contains("WARN")
                    || l.contains("not delivered")
                    || l.contains(&format!(":{port} "))
                    || l.contains(&format!(":{port}\""))
            })
            .collect();
        assert_eq!(stats.errors, 0, "{what}: {stats:?}\n{}", notes.join("\n"));
        assert!(stats.ok >= 20, "{what}: the load ran: {stats:?}");
    }
    // Every old process exits within the drain period; fds return to baseline.
    let deadline = Instant::now() + Duration::from_secs(15);
    while old.iter().any(|&p| alive(p)) {
        assert!(
            Instant::now() < deadline,
            "old processes still alive: {:?}",
            old.iter().filter(|&&p| alive(p)).collect::<Vec<_>>()
        );
        thread::sleep(Duration::from_millis(50));
    }
    let left = wait_fds_at_most(pm.pid(), baseline, Duration::from_secs(10));
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", pm.pid()))
        .map(|d| {
            d.flatten().filter_map(|e| std::fs::read_link(e.path()).ok()).map(|p| p.display().to_string()).collect()
        })
        .unwrap_or_default();
    assert!(left <= baseline, "fds of the serving process back to baseline: {left} > {baseline}: {fds:?}");
    assert_eq!(get(handoff, "x", "/").unwrap().body, "svc");
    assert_eq!(get(forward, "x", "/").unwrap().body, "fwd");
}

/// Reads 8-byte big-endian counters and checks each follows the last.
fn check_counter(mut s: TcpStream, stop: Arc<AtomicBool>, seen: Arc<AtomicU64>) -> JoinHandle<Result<u64, String>> {
    thread::spawn(move || {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut expect = 0u64;
        let mut b = [0u8; 8];
        while !stop.load(Ordering::Relaxed) {
            s.read_exact(&mut b).map_err(|e| format!("after {expect}: {e}"))?;
            let n = u64::from_be_bytes(b);
            if n != expect {
                return Err(format!("expected {expect}, got {n}"));
            }
            expect += 1;
            seen.store(expect, Ordering::Relaxed);
        }
        Ok(expect)
    })
}

/// Writes counters to `s` until it fails, a few at a time.
fn stream_counter(mut s: TcpStream) {
    thread::spawn(move || {
        let mut n = 0u64;
        loop {
            let mut chunk = Vec::with_capacity(800);
            for _ in 0..100 {
                chunk.extend_from_slice(&n.to_be_bytes());
                n += 1;
            }
            if s.write_all(&chunk).is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(2));
        }
    });
}

#[test]
fn long_lived_streams_continue_byte_exact_across_upgrades() {
    let mut pm = Portmux::start(&[]);
    let (handoff, forward) = (free_port(), free_port());
    // A handed-off stream: a service built on the client library.
    let listener =
        portmux_client::Builder::new().route(format!("tcp://:{handoff}")).control(pm.control()).bind().unwrap();
    thread::spawn(move || {
        while let Ok((s, _)) = listener.accept() {
            stream_counter(s);
        }
    });
    // A forwarded stream: a backend that streams a counter to whoever connects.
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let backend_addr = backend.local_addr().unwrap();
    thread::spawn(move || {
        for s in backend.incoming().flatten() {
            stream_counter(s);
        }
    });
    assert!(
        portmux_cli(&pm, &["route", "add", &format!("tcp://:{forward}"), "--backend", &backend_addr.to_string()]).0
    );

    let stop = Arc::new(AtomicBool::new(false));
    let (seen_h, seen_f) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let h = check_counter(client(handoff), stop.clone(), seen_h.clone());
    let f = check_counter(client(forward), stop.clone(), seen_f.clone());
    thread::sleep(Duration::from_millis(200));
    let mut old = Vec::new();
    for i in 0..20 {
        old.push(pm.pid());
        pm.upgrade(&[]).unwrap_or_else(|e| panic!("upgrade {i}: {e}"));
        thread::sleep(Duration::from_millis(50));
    }
    // Both streams keep flowing after the last upgrade.
    let (h_then, f_then) = (seen_h.load(Ordering::Relaxed), seen_f.load(Ordering::Relaxed));
    thread::sleep(Duration::from_millis(500));
    assert!(seen_h.load(Ordering::Relaxed) > h_then, "the handed-off stream flows");
    assert!(seen_f.load(Ordering::Relaxed) > f_then, "the forwarded stream flows");
    stop.store(true, Ordering::Relaxed);
    let counted = (h.join().unwrap().unwrap(), f.join().unwrap().unwrap());
    assert!(counted.0 > 1000 && counted.1 > 1000, "{counted:?}");
    assert!(pm.log().contains("the previous portmux handed over everything relays=1"), "the relay moved each time");
    let deadline = Instant::now() + Duration::from_secs(15);
    while old.iter().any(|&p| alive(p)) {
        assert!(Instant::now() < deadline, "every old process exits");
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_new_binary_that_fails_leaves_the_old_one_serving() {
    let dir = TempDir::new();
    let mut pm = Portmux::start(&[]);
    let port = free_port();
    let _svc = Service::hello(&pm, &format!("http://:{port}"), "still old", &[]);
    assert_eq!(get(port, "x", "/").unwrap().body, "still old");
    let first = pm.pid();
    let baseline = fd_count(first);

    let exits = dir.path().join("exits.sh");
    std::fs::write(&exits, "#!/bin/sh\necho 'broken build' >&2\nexit 3\n").unwrap();
    let bad_flag = dir.path().join("bad-flag.sh");
    std::fs::write(&bad_flag, format!("#!/bin/sh\nexec {} \"$@\" --peek-max 1\n", env!("CARGO_BIN_EXE_portmux")))
        .unwrap();
    for script in [&exits, &bad_flag] {
        std::fs::set_permissions(script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let err = pm.upgrade(&["--binary", exits.to_str().unwrap()]).unwrap_err();
    assert!(err.starts_with("exit code 1") && err.contains("exited before it was ready: exit status: 3"), "{err}");
    // A portmux that fails says why, and that reason is what `portmux upgrade` reports.
    let err = pm.upgrade(&["--binary", bad_flag.to_str().unwrap()]).unwrap_err();
    assert!(err.contains("invalid value '1' for '--peek-max"), "{err}");
    let err = pm.upgrade(&["--binary", "/nonexistent/portmux"]).unwrap_err();
    assert!(err.contains("/nonexistent/portmux"), "{err}");
    assert_eq!(pm.pid(), first);
    assert_eq!(get(port, "x", "/").unwrap().body, "still old", "the old process keeps serving");
    // Failed attempts leave nothing behind: no fd, no process.
    let left = wait_fds_at_most(first, baseline, Duration::from_secs(10));
    assert!(left <= baseline, "fds after failed upgrades: {left} > {baseline}");
    let children = std::fs::read_to_string(format!("/proc/{first}/task/{first}/children")).unwrap_or_default();
    assert!(children.trim().is_empty(), "no process left from the failed upgrades: {children}");
    // And a good upgrade still works afterwards; the service moves along.
    let new = pm.upgrade(&[]).unwrap();
    assert_ne!(new, first);
    assert_eq!(get(port, "x", "/").unwrap().body, "still old");
}

#[test]
fn sigusr2_upgrades_too() {
    let mut pm = Portmux::start(&[]);
    let port = free_port();
    let _svc = Service::hello(&pm, &format!("http://:{port}"), "served", &[]);
    let first = pm.pid();
    pm.signal(rustix::process::Signal::USR2);
    // The admin API moves with everything else: the process answering it is the new one.
    pm.wait_for("the new process serving", |pm| pm.status().pid != first);
    let pid = pm.status().pid;
    pm.follow(pid);
    assert!(pm.log().contains(&format!("upgrade done: the new process serves pid={pid}")), "{}", pm.log());
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(first) {
        assert!(Instant::now() < deadline, "the old process exits");
        thread::sleep(Duration::from_millis(20));
    }
    assert!(alive(pid));
    assert_eq!(get(port, "x", "/").unwrap().body, "served");
}
