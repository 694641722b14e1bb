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
    // Pooled backend connections simply close in the old process; in the new one they expire.
    let mut pm = Portmux::start(&["--drain", "10s", "--pool-idle-timeout", "1s"]);
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
            stream_counter(s.into_inner());
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
    // The stand-ins live in a temporary directory, which the sandbox does not
    // let portmux execute (security::the_sandbox_is_in_force shows that).
    let mut pm = Portmux::start(&["--no-sandbox"]);
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
    // The sockets' files are the new process's now: it removes them when it stops.
    let control = pm.control().to_path_buf();
    pm.signal(rustix::process::Signal::TERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(pid) {
        assert!(Instant::now() < deadline, "the new process stops");
        thread::sleep(Duration::from_millis(20));
    }
    assert!(!control.exists(), "the control socket is removed");
    assert!(!control.with_file_name("admin.sock").exists(), "the admin socket is removed");
}

/// A stand-in "new binary" (python) that says Start, as a portmux would,
/// and then either takes the whole state and stops answering (`stall`: it
/// holds the handover socket and never says Ready; it creates `stall.frozen`
/// once the state is in, which the old process sends only after freezing) or
/// closes the handover and lingers (`close`).
fn fake_new_binary(dir: &std::path::Path, mode: &str) -> std::path::PathBuf {
    use portmux_wire::Handover;
    let start = portmux_wire::encode(&Handover::Start { version: portmux_wire::HANDOVER_VERSION, pid: 1 }).unwrap();
    let hex: String = start.iter().map(|b| format!("{b:02x}")).collect();
    let state_end = portmux_wire::encode(&Handover::StateEnd { next_conn_id: 0 }).unwrap()[0];
    let script = dir.join(format!("{mode}.py"));
    let frozen = dir.join(format!("{mode}.frozen"));
    let after = match mode {
        "stall" => format!(
            "while s.recvmsg(70000, socket.CMSG_SPACE(64))[0][:1] != bytes([{state_end}]): pass\n\
             open('{}', 'w').close()\ntime.sleep(120)",
            frozen.display()
        ),
        _ => "s.close()\ntime.sleep(120)".to_string(),
    };
    std::fs::write(
        &script,
        format!(
            "#!/usr/bin/env python3\nimport os, socket, time\n\
             s = socket.socket(fileno=int(os.environ['PORTMUX_UPGRADE_FD']))\ns.setblocking(True)\n\
             s.send(bytes.fromhex('{hex}'))\n{after}\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    script
}

#[test]
fn a_new_process_that_stops_answering_after_the_freeze_is_killed_and_the_old_one_thaws() {
    let dir = TempDir::new();
    // (--no-sandbox: the stand-in runs from a temporary directory.)
    let mut pm = Portmux::start(&["--upgrade-timeout", "2s", "--no-sandbox"]);
    let port = free_port();
    let _svc = Service::hello(&pm, &format!("http://:{port}"), "served", &[]);
    let first = pm.pid();
    for (mode, why) in [
        ("stall", "was not ready within 2s of the freeze; it was stopped"),
        ("close", "closed the handover before it was ready; it was stopped"),
    ] {
        let script = fake_new_binary(dir.path(), mode);
        // A client arriving meanwhile waits in the kernel and is served after the thaw.
        let meanwhile = thread::spawn(move || {
            thread::sleep(Duration::from_millis(500));
            get(port, "x", "/meanwhile").map(|r| r.body).map_err(|e| e.to_string())
        });
        let started = Instant::now();
        let err = pm.upgrade(&["--binary", script.to_str().unwrap()]).unwrap_err();
        let took = started.elapsed();
        assert!(err.contains(why), "{mode}: {err}\n{}", pm.log());
        assert!(took < Duration::from_secs(8), "{mode}: the upgrade gave up after {took:?}");
        assert_eq!(meanwhile.join().unwrap().as_deref(), Ok("served"), "{mode}: the client that came meanwhile");
        assert_eq!(get(port, "x", "/").unwrap().body, "served", "{mode}: the old process serves on");
        assert_eq!(pm.status().state, "serving");
        assert_eq!(pm.pid(), first);
        // The stand-in was killed, and reaped.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let children = std::fs::read_to_string(format!("/proc/{first}/task/{first}/children")).unwrap_or_default();
            if children.trim().is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "{mode}: the stand-in is still there: {children}");
            thread::sleep(Duration::from_millis(20));
        }
    }
    // And a later upgrade still works.
    let new = pm.upgrade(&[]).unwrap_or_else(|e| panic!("{e}\n{}", pm.log()));
    assert_ne!(new, first);
    assert_eq!(get(port, "x", "/").unwrap().body, "served");
}

#[test]
fn a_connection_being_handed_over_when_the_state_freezes_is_delivered_by_the_new_process() {
    // A service that reads nothing: its session socket fills up, and the next
    // hand-over waits for room (for up to 3 s) when the upgrade freezes everything.
    let mut pm = Portmux::start(&["--handoff-patience", "3s"]);
    let port = free_port();
    let spec = format!("http://:{port}");
    let raw = RawSession::register(pm.control(), "full", &[&spec]);
    let sending = |pm: &Portmux| match pm.route(&spec).map(|r| r.target) {
        Some(portmux::admin::TargetView::Service { instances, .. }) => {
            instances.iter().map(|i| i.waiting_for_room).sum()
        }
        _ => 0,
    };
    let mut clients = Vec::new();
    while sending(&pm) == 0 {
        assert!(clients.len() < 5000, "the session's socket never filled up");
        let mut c = client(port);
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        clients.push(c);
        if clients.len() % 50 == 0 {
            thread::sleep(Duration::from_millis(20)); // let the hand-overs catch up
        }
    }
    let old = pm.pid();
    pm.upgrade(&[]).unwrap_or_else(|e| panic!("{e}\n{}", pm.log()));
    // The old process exits once its last connection task is done, so by then
    // that hand-over has given up waiting (and its connection must not be lost).
    let deadline = Instant::now() + Duration::from_secs(20);
    while alive(old) {
        assert!(Instant::now() < deadline, "the old process exits");
        thread::sleep(Duration::from_millis(20));
    }
    // The service now reads: every client's connection reaches it, exactly once.
    let mut seen = std::collections::HashSet::new();
    while seen.len() < clients.len() {
        match raw.recv() {
            Some((portmux_wire::Message::Connection { id, .. }, Some(_fd))) => {
                assert!(seen.insert(id), "connection {id} was delivered twice");
                raw.send(&portmux_wire::Message::Ack { id });
            }
            other => panic!("after {} of {} connections: {other:?}\n{}", seen.len(), clients.len(), pm.log()),
        }
    }
}

#[test]
fn a_connection_the_old_process_cannot_hand_on_is_answered_not_dropped() {
    let mut pm = Portmux::start(&["--drain", "10s"]);
    let port = free_port();
    let _svc = Service::hello(&pm, &format!("http://:{port}"), "served", &[]);
    let old = pm.pid();
    // A slow client: accepted by the old process, its request not complete yet.
    let mut slow = client(port);
    slow.write_all(b"GET /late HTTP/1.1\r\n").unwrap();
    pm.wait_for("the old process working on the slow client", |pm| pm.status().connections == 1);
    let new = pm.upgrade(&[]).unwrap();
    // The new process dies before the old one could give it this client.
    rustix::process::kill_process(rustix::process::Pid::from_raw(new as i32).unwrap(), rustix::process::Signal::KILL)
        .unwrap();
    // Gone for good: reaped (a zombie leader may still have threads holding its sockets).
    while std::path::Path::new(&format!("/proc/{new}")).exists() {
        thread::sleep(Duration::from_millis(5));
    }
    slow.write_all(b"Host: x\r\n\r\n").unwrap();
    let r = read_response(&mut slow).unwrap_or_else(|e| panic!("{e}\n{}", pm.log()));
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.body.contains("portmux is being replaced"), "{}", r.body);
    // (The line was written before the answer went out; the capture may lag.)
    assert!(pm.wait_log("cannot hand a connection to the new process", Duration::from_secs(5)), "{}", pm.log());
    let deadline = Instant::now() + Duration::from_secs(20);
    while alive(old) {
        assert!(Instant::now() < deadline, "the old process exits");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn stopping_during_an_upgrade_undoes_it_and_answers_each_client_once() {
    let dir = TempDir::new();
    // (--no-sandbox: the stand-in runs from a temporary directory.)
    let mut pm = Portmux::start(&["--upgrade-timeout", "5s", "--no-sandbox"]);
    let port = free_port();
    let spec = format!("http://:{port}");
    Service::hello(&pm, &spec, "gone", &["--name", "away"]).kill();
    pm.wait_reserved(&spec);
    let mut waiting = client(port);
    waiting.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    pm.wait_queued(&spec, 1);
    let script = fake_new_binary(dir.path(), "stall");
    let (control, first) = (pm.control().to_path_buf(), pm.pid());
    let upgrade = thread::spawn(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_portmux"))
            .args(["upgrade", "--control", control.to_str().unwrap(), "--binary", script.to_str().unwrap()])
            .output()
            .unwrap()
    });
    // The stand-in has the state (so portmux froze it): now portmux is told to stop.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dir.path().join("stall.frozen").exists() {
        assert!(Instant::now() < deadline, "the stand-in never got the state\n{}", pm.log());
        thread::sleep(Duration::from_millis(5));
    }
    let children = std::fs::read_to_string(format!("/proc/{first}/task/{first}/children")).unwrap_or_default();
    let child: u32 = children.split_whitespace().next().and_then(|p| p.parse().ok()).expect("the stand-in runs");
    assert_eq!(exit_text(pm.terminate(Duration::from_secs(15))), "exit code 0", "{}", pm.log());
    assert!(!upgrade.join().unwrap().status.success(), "the upgrade did not happen");
    // The queued client got one answer, from the process that stopped, then a clean close.
    let r = read_response(&mut waiting).unwrap();
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.body.contains("portmux is stopping"), "{}", r.body);
    assert_eq!(read_until_close(&mut waiting), Ok(vec![]));
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(child) {
        assert!(Instant::now() < deadline, "the stand-in was stopped");
        thread::sleep(Duration::from_millis(20));
    }
    assert!(!pm.control().exists(), "the control socket is removed: no portmux serves it");
    assert!(pm.log().contains("undoing the upgrade in progress first"), "{}", pm.log());
}

/// Lines from `r` sent to a channel, so that a test can wait for one with a deadline.
fn line_channel(r: impl Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(r)).map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

fn wait_line_starting(rx: &std::sync::mpsc::Receiver<String>, prefix: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) if line.starts_with(prefix) => return line,
            Ok(_) => {}
            Err(_) => break,
        }
    }
    panic!("no line starting with {prefix:?} within {within:?}");
}

#[test]
fn a_foreground_portmux_in_a_terminal_survives_an_upgrade_and_stops_on_ctrl_c() {
    use std::io::Write;
    let dir = TempDir::new();
    let control = dir.path().join("control.sock");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/fixtures/pty_run.py");
    let mut term = std::process::Command::new("python3")
        .arg(script)
        .arg(env!("CARGO_BIN_EXE_portmux"))
        .args(["run", "--bind", "127.0.0.1", "--control"])
        .arg(&control)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env_remove("PORTMUX_CONTROL")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let lines = line_channel(term.stdout.take().unwrap());
    let ready = wait_line_starting(&lines, "READY ", Duration::from_secs(30));
    let foreground: u32 = ready["READY ".len()..].trim().parse().unwrap();
    let port = free_port();
    let _svc = Service::try_hello(&control, &format!("http://tty.test:{port}"), "tty", &[]).unwrap();
    assert_eq!(get(port, "tty.test", "/").unwrap().body, "tty");
    let admin_addr = AdminAddr::Unix(control.with_file_name("admin.sock"));
    let serving = |addr: &AdminAddr| {
        let (_, body) = admin(addr, "GET", "/status", None);
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["pid"].as_u64().unwrap() as u32
    };
    let first = serving(&admin_addr);
    assert_ne!(first, foreground, "the terminal's process supervises; another serves");

    // The upgrade: the terminal's process stays, the new one serves, the old one goes.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portmux"))
        .args(["upgrade", "--control"])
        .arg(&control)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let second = serving(&admin_addr);
    assert_ne!(second, first);
    let deadline = Instant::now() + Duration::from_secs(20);
    while alive(first) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    assert!(!alive(first), "the old process exited");
    assert!(alive(foreground), "the shell's job is still running");
    assert_eq!(get(port, "tty.test", "/").unwrap().body, "tty");
    assert!(lines.try_recv().map_or(true, |l| !l.starts_with("EXIT")), "nothing ended yet");

    // Ctrl-C in the terminal stops the process serving now, and the job ends with it.
    writeln!(term.stdin.as_mut().unwrap(), "INTR").unwrap();
    let exit = wait_line_starting(&lines, "EXIT ", Duration::from_secs(20));
    assert_eq!(exit, "EXIT 0");
    assert!(!alive(second), "the serving process stopped");
    let _ = term.wait();
}
