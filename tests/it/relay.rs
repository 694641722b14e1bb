//! Forwarded flows relayed in the kernel (sockhash and portmux's sk_skb
//! program) and in user space behave the same through the real binary:
//! bulk both ways byte-exact with half-close either way, the idle timeout, a
//! backend that stops reading, resets, thousands of short flows, a stream
//! across upgrades, the fallback when the kernel refuses, and a request of
//! the per-request engine that switched protocols (WebSocket).

use crate::security::{NOBODY, as_nobody};
use crate::util::*;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

const MODES: [&str; 2] = ["kernel", "user"];

/// portmux relaying in `mode`, as its status says.
fn start(mode: &str, extra: &[&str]) -> Portmux {
    let mut args = vec!["--relay", mode];
    args.extend_from_slice(extra);
    let pm = Portmux::start(&args);
    let relay = pm.status().relay;
    assert!(relay.starts_with(mode), "{mode}: the status says {relay}");
    pm
}

/// A route on a free port to `backend`; returns the port.
fn route_to(pm: &Portmux, backend: SocketAddr) -> u16 {
    let port = free_port();
    let (ok, _, err) = portmux_cli(pm, &["route", "add", &format!("tcp://:{port}"), "--backend", &backend.to_string()]);
    assert!(ok, "{err}");
    port
}

/// A route to a backend that only accepts: each accepted socket comes out
/// of the receiver for the test to drive. Returns the route's port.
fn route_to_held(pm: &Portmux) -> (u16, mpsc::Receiver<TcpStream>) {
    let (conn_tx, conn_rx) = mpsc::channel::<TcpStream>();
    let (addr, _) = spawn_backend(move |s| conn_tx.send(s).unwrap());
    (route_to(pm, addr), conn_rx)
}

/// The fd count once no connection task is left (a flow's sockets closed).
fn settled_fds(pm: &Portmux) -> usize {
    pm.wait_for("the last flow to end", |pm| pm.status().connections == 0);
    fd_count(pm.pid())
}

/// Flows relayed (in the kernel, in user space), as the status says.
fn relayed(pm: &Portmux) -> (u64, u64) {
    pm.status().relayed
}

fn payload(len: usize, seed: u32) -> Vec<u8> {
    (0..len).map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 11) as u8).collect()
}

/// The client waits for the backend's first line, so the flow is set up
/// (and, in the kernel mode, in the map) before either side ends.
fn handshake(s: &mut TcpStream) {
    let mut b = [0u8; 3];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"go\n");
    s.write_all(b"k").unwrap();
}

#[test]
fn bulk_both_ways_is_byte_exact_with_half_close_either_way_in_both_modes() {
    for mode in MODES {
        let pm = start(mode, &[]);
        // The backend reads the client's bytes to the end while sending its
        // own; `backend_first`: it finishes (FIN) before the client starts.
        let (tx, rx) = mpsc::channel::<(Vec<u8>, bool)>();
        let rx = Arc::new(std::sync::Mutex::new(rx));
        let (got_tx, got_rx) = mpsc::channel::<Vec<u8>>();
        let (addr, _) = spawn_backend(move |mut s| {
            let (answer, backend_first) = rx.lock().unwrap().recv().unwrap();
            s.write_all(b"go\n").unwrap();
            // The client's answer says the flow is relaying (a side that has
            // ended already is relayed in user space: the kernel takes only
            // established sockets).
            let mut ok = [0u8; 1];
            s.read_exact(&mut ok).unwrap();
            let mut w = s.try_clone().unwrap();
            let mut writer = Some(thread::spawn(move || {
                w.write_all(&answer).unwrap();
                w.shutdown(Shutdown::Write).unwrap();
            }));
            if backend_first {
                writer.take().unwrap().join().unwrap();
            }
            let mut got = Vec::new();
            s.read_to_end(&mut got).unwrap();
            got_tx.send(got).unwrap();
            if let Some(w) = writer {
                w.join().unwrap();
            }
        });
        let port = route_to(&pm, addr);
        let before = relayed(&pm);
        let sizes = [1usize, 1000, 65_537, 3 << 20, (24 << 20) + 7];
        for (n, &size) in sizes.iter().enumerate() {
            for backend_first in [false, true] {
                let up = payload(size, n as u32);
                let down = payload(size / 2 + 3, 99 + n as u32);
                tx.send((down.clone(), backend_first)).unwrap();
                let mut s = client(port);
                s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                handshake(&mut s);
                let mut back = Vec::new();
                if backend_first {
                    // The backend's FIN comes first; the client still sends after it.
                    s.read_to_end(&mut back).unwrap();
                    s.write_all(&up).unwrap();
                    s.shutdown(Shutdown::Write).unwrap();
                } else {
                    let mut w = s.try_clone().unwrap();
                    let sent = up.clone();
                    let writer = thread::spawn(move || {
                        w.write_all(&sent).unwrap();
                        w.shutdown(Shutdown::Write).unwrap();
                    });
                    s.read_to_end(&mut back).unwrap();
                    writer.join().unwrap();
                }
                let got = got_rx.recv_timeout(Duration::from_secs(20)).unwrap();
                let case = format!("{mode}, {size} bytes, backend first: {backend_first}");
                assert!(got.len() == up.len() && got == up, "{case}: the backend got {} bytes", got.len());
                assert!(back.len() == down.len() && back == down, "{case}: the client got {} bytes", back.len());
            }
        }
        let after = relayed(&pm);
        let flows = (sizes.len() * 2) as u64;
        match mode {
            "kernel" => assert_eq!(after.0 - before.0, flows, "every flow went through the kernel: {after:?}"),
            _ => assert_eq!((after.0, after.1 - before.1), (0, flows), "every flow stayed in user space"),
        }
    }
}

#[test]
fn the_idle_timeout_ends_quiet_flows_and_spares_busy_ones_in_both_modes() {
    for mode in MODES {
        let pm = start(mode, &["--idle-timeout", "1s"]);
        let echo = TestBackend::start("echo", false);
        let port = route_to(&pm, echo.addr);
        // Busy: a byte each 300 ms for 2.4 s (past the timeout) is echoed each time.
        let (mut busy, _) = greeted(port);
        busy.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        for i in 0..8u8 {
            thread::sleep(Duration::from_millis(300));
            busy.write_all(&[i]).unwrap();
            let mut b = [0u8; 1];
            busy.read_exact(&mut b).unwrap_or_else(|e| panic!("{mode}: the busy flow ended after {i}: {e}"));
            assert_eq!(b[0], i);
        }
        // Quiet: closed by portmux between 1 and a few seconds later.
        let (mut quiet, _) = greeted(port);
        quiet.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let began = Instant::now();
        let mut rest = Vec::new();
        let end = quiet.read_to_end(&mut rest);
        let took = began.elapsed();
        assert!(end.is_ok() || end.is_err_and(|e| e.kind() == ErrorKind::ConnectionReset), "{mode}");
        assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(4), "{mode}: closed after {took:?}");
    }
}

/// CPU seconds process `pid` used so far (user + system).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // USER_HZ, which /proc reports in, is 100 on Linux.
    ticks / 100.0
}

#[test]
fn a_backend_that_stops_reading_holds_bounded_memory_without_a_busy_loop_in_both_modes() {
    for mode in MODES {
        let pm = start(mode, &[]);
        let (port, conn_rx) = route_to_held(&pm);
        let mut s = client(port);
        let mut backend = conn_rx.recv_timeout(Duration::from_secs(5)).unwrap();
        // A first exchange, so the flow is relaying before the backend stalls.
        s.write_all(b"hi").unwrap();
        let mut b = [0u8; 2];
        backend.read_exact(&mut b).unwrap();
        s.set_nonblocking(true).unwrap();
        let chunk = vec![7u8; 64 * 1024];
        let (mut sent, cpu_before) = (0usize, cpu_seconds(pm.pid()));
        let began = Instant::now();
        let mut blocked_since: Option<Instant> = None;
        // Until the client has been unable to write for 500 ms (or 4 s).
        while began.elapsed() < Duration::from_secs(4) {
            match s.write(&chunk) {
                Ok(n) => {
                    sent += n;
                    blocked_since = None;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if blocked_since.get_or_insert_with(Instant::now).elapsed() > Duration::from_millis(500) {
                        break;
                    }
                    thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("{mode}: {e}"),
            }
        }
        let cpu = cpu_seconds(pm.pid()) - cpu_before;
        assert!(blocked_since.is_some(), "{mode}: the client was never held back ({sent} bytes sent)");
        assert!(sent < 64 << 20, "{mode}: {} MiB went into a backend that reads nothing", sent >> 20);
        assert!(cpu < 0.5, "{mode}: portmux spent {cpu:.2} s of CPU while the backend stalled");
        // The backend reads again: every byte arrives, in order, and the flow goes on.
        s.set_nonblocking(false).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        backend.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        backend.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), sent, "{mode}");
        assert!(got.iter().all(|&b| b == 7), "{mode}");
    }
}

/// Closes `s` with a reset (SO_LINGER 0).
fn reset(s: TcpStream) {
    rustix::net::sockopt::set_socket_linger(&s, Some(Duration::ZERO)).unwrap();
    drop(s);
}

#[test]
fn a_reset_from_either_side_ends_the_flow_and_fds_return_to_baseline_in_both_modes() {
    for mode in MODES {
        let pm = start(mode, &[]);
        let (port, conn_rx) = route_to_held(&pm);
        // Warm up (the listener, pools), then count.
        let flow = |port| {
            let mut s = client(port);
            let mut backend = conn_rx.recv_timeout(Duration::from_secs(5)).unwrap();
            s.write_all(b"ping").unwrap();
            let mut b = [0u8; 4];
            backend.read_exact(&mut b).unwrap();
            backend.write_all(b"pong").unwrap();
            s.read_exact(&mut b).unwrap();
            for s in [&s, &backend] {
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            }
            (s, backend)
        };
        let (a, b) = flow(port);
        drop((a, b));
        let baseline = settled_fds(&pm);
        for client_resets in [true, false] {
            let (s, backend) = flow(port);
            let (mut survivor, who) = if client_resets {
                reset(s);
                (backend, "the backend")
            } else {
                reset(backend);
                (s, "the client")
            };
            let began = Instant::now();
            let mut rest = Vec::new();
            let end = survivor.read_to_end(&mut rest);
            assert!(
                end.is_ok() || end.as_ref().is_err_and(|e| e.kind() == ErrorKind::ConnectionReset),
                "{mode}: {who} saw {end:?}"
            );
            assert!(began.elapsed() < Duration::from_secs(3), "{mode}: {who} learned of the reset promptly");
        }
        let now = wait_fds_at_most(pm.pid(), baseline, Duration::from_secs(5));
        assert!(now <= baseline, "{mode}: {now} fds open, {baseline} before");
    }
}

#[test]
fn thousands_of_short_flows_leave_fds_at_baseline_in_both_modes() {
    for mode in MODES {
        let pm = start(mode, &[]);
        let echo = TestBackend::start("echo", false);
        let port = route_to(&pm, echo.addr);
        let (s, _) = greeted(port);
        drop(s);
        let baseline = settled_fds(&pm);
        let before = relayed(&pm);
        let flows = 2000u64;
        let began = Instant::now();
        for i in 0..flows {
            let (mut s, name) = greeted(port);
            assert_eq!(name, "echo");
            s.write_all(&i.to_be_bytes()).unwrap();
            let mut b = [0u8; 8];
            s.read_exact(&mut b).unwrap();
            assert_eq!(u64::from_be_bytes(b), i, "{mode}");
            assert!(began.elapsed() < Duration::from_secs(60), "{mode}: bounded in time");
        }
        let now = wait_fds_at_most(pm.pid(), baseline, Duration::from_secs(10));
        assert!(now <= baseline, "{mode}: {now} fds open after {flows} flows, {baseline} before");
        let after = relayed(&pm);
        let in_kernel = after.0 - before.0;
        match mode {
            "kernel" => assert_eq!(in_kernel, flows, "{after:?}"),
            _ => assert_eq!(in_kernel, 0),
        }
    }
}

#[test]
fn a_stream_continues_byte_exact_across_upgrades_and_the_old_process_exits_at_once_in_both_modes() {
    for mode in MODES {
        let mut pm = start(mode, &[]);
        // The backend echoes; the client sends a counter and checks what comes back.
        let echo = TestBackend::start("echo", false);
        let port = route_to(&pm, echo.addr);
        let (s, _) = greeted(port);
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(AtomicU64::new(0));
        let mut w = s.try_clone().unwrap();
        let stop_w = stop.clone();
        let writer = thread::spawn(move || {
            let mut n = 0u64;
            while !stop_w.load(Ordering::Relaxed) {
                let chunk: Vec<u8> = (n..n + 512).flat_map(u64::to_be_bytes).collect();
                w.write_all(&chunk).unwrap();
                n += 512;
                thread::sleep(Duration::from_millis(1));
            }
            w.shutdown(Shutdown::Write).unwrap();
            n
        });
        let seen_r = seen.clone();
        let reader = thread::spawn(move || {
            let mut s = s;
            let (mut expect, mut b) = (0u64, [0u8; 8]);
            loop {
                match s.read_exact(&mut b) {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::UnexpectedEof => return Ok(expect),
                    Err(e) => return Err(format!("after {expect}: {e}")),
                }
                let n = u64::from_be_bytes(b);
                if n != expect {
                    return Err(format!("expected {expect}, got {n}"));
                }
                expect += 1;
                seen_r.store(expect, Ordering::Relaxed);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        while seen.load(Ordering::Relaxed) < 1000 {
            assert!(Instant::now() < deadline, "{mode}: the stream flows before the upgrades");
            thread::sleep(Duration::from_millis(10));
        }
        for i in 0..3 {
            let old = pm.pid();
            pm.upgrade(&[]).unwrap_or_else(|e| panic!("{mode}: upgrade {i}: {e}"));
            let deadline = Instant::now() + Duration::from_secs(3);
            while alive(old) {
                assert!(Instant::now() < deadline, "{mode}: the old process exits at once");
                thread::sleep(Duration::from_millis(20));
            }
            let then = seen.load(Ordering::Relaxed);
            let deadline = Instant::now() + Duration::from_secs(5);
            while seen.load(Ordering::Relaxed) <= then + 1000 {
                assert!(Instant::now() < deadline, "{mode}: the stream flows after upgrade {i}");
                thread::sleep(Duration::from_millis(10));
            }
        }
        let relay = pm.status().relay;
        assert!(relay.starts_with(mode), "{mode}: after the upgrades the status says {relay}");
        stop.store(true, Ordering::Relaxed);
        let sent = writer.join().unwrap();
        let echoed = reader.join().unwrap().unwrap_or_else(|e| panic!("{mode}: {e}"));
        assert_eq!(echoed, sent, "{mode}: every counter came back, in order, and the end too");
    }
}

#[test]
fn without_privileges_the_kernel_relay_falls_back_and_says_why_or_refuses_to_start_if_demanded() {
    let dir = TempDir::new();
    std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY)).unwrap();
    let control = dir.path().join("control.sock");
    let run = |relay: &str| {
        let mut cmd = as_nobody(Path::new(env!("CARGO_BIN_EXE_portmux")));
        cmd.args(["run", "--bind", "127.0.0.1", "--relay", relay, "--control"]).arg(&control);
        Portmux::spawn(cmd, &control, None)
    };
    let e = run("kernel").err().expect("refused");
    assert!(e.contains("--relay kernel: the kernel refused the in-kernel relay"), "{e}");
    assert!(e.contains("CAP_BPF"), "it says what to do: {e}");
    let pm = run("auto").unwrap();
    let relay = pm.status().relay;
    assert!(relay.starts_with("user (") && relay.contains("refused"), "{relay}");
    // Forwarding works all the same, in user space.
    let echo = TestBackend::start("echo", false);
    let port = route_to(&pm, echo.addr);
    let (mut s, name) = greeted(port);
    assert_eq!(name, "echo");
    s.write_all(b"still relayed").unwrap();
    let mut b = [0u8; 13];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"still relayed");
    assert_eq!(relayed(&pm), (0, 1));
}

/// What a process holds resident, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn loading_the_kernel_relay_leaves_no_memory_resident() {
    // aya parses the kernel's BTF (about 14 MiB) to load the program; once
    // it is loaded, that memory goes back to the system.
    let at_start = |mode| rss_kib(start(mode, &[]).pid());
    let (kernel, user) = (at_start("kernel"), at_start("user"));
    assert!(kernel < user + 6 * 1024, "resident once serving: kernel mode {kernel} KiB, user mode {user} KiB");
}

/// Reads a response head (up to its blank line) byte by byte.
fn read_head(s: &mut TcpStream) -> String {
    let (mut head, mut b) = (Vec::new(), [0u8; 1]);
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).unwrap(), 1, "the head ended early: {:?}", String::from_utf8_lossy(&head));
        head.push(b[0]);
    }
    String::from_utf8(head).unwrap()
}

#[test]
fn a_request_that_switched_protocols_is_relayed_as_a_forwarded_flow_in_both_modes() {
    for mode in MODES {
        let mut pm = start(mode, &[]);
        // A backend that switches to an echo protocol and sends its greeting
        // with the 101 (hyper reads both at once: the greeting must still
        // reach the client, first).
        let (addr, _) = spawn_backend(|mut s| {
            read_head(&mut s);
            s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\nhi\n")
                .unwrap();
            let mut r = s.try_clone().unwrap();
            let _ = std::io::copy(&mut r, &mut s);
            let _ = s.shutdown(Shutdown::Write);
        });
        // The per-request engine (no ?mode=connection) parses the request.
        let port = free_port();
        let (ok, _, err) =
            portmux_cli(&pm, &["route", "add", &format!("http://:{port}"), "--backend", &addr.to_string()]);
        assert!(ok, "{err}");
        let before = relayed(&pm);
        let mut s = client(port);
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n").unwrap();
        let head = read_head(&mut s);
        assert!(head.starts_with("HTTP/1.1 101"), "{mode}: {head}");
        let mut greeting = [0u8; 3];
        s.read_exact(&mut greeting).unwrap();
        assert_eq!(&greeting, b"hi\n", "{mode}: the greeting that came with the 101 comes first");
        let ping = |s: &mut TcpStream, what: &[u8]| {
            s.write_all(what).unwrap();
            let mut back = vec![0u8; what.len()];
            s.read_exact(&mut back).unwrap();
            assert_eq!(back, what, "{mode}: echoed");
        };
        ping(&mut s, b"before");
        if mode == "kernel" {
            // Moved to the new process like any forwarded flow; the old one exits at once.
            let old = pm.pid();
            pm.upgrade(&[]).unwrap();
            let deadline = Instant::now() + Duration::from_secs(3);
            while alive(old) {
                assert!(Instant::now() < deadline, "the old process exits at once");
                thread::sleep(Duration::from_millis(20));
            }
            ping(&mut s, b"after the upgrade");
        }
        let up = payload((3 << 20) + 5, 7);
        let mut w = s.try_clone().unwrap();
        let sent = up.clone();
        let writer = thread::spawn(move || {
            w.write_all(&sent).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
        });
        let mut back = Vec::new();
        s.read_to_end(&mut back).unwrap();
        writer.join().unwrap();
        assert!(back == up, "{mode}: {} bytes echoed of {}", back.len(), up.len());
        let after = relayed(&pm);
        match mode {
            "kernel" => assert_eq!(after.0 - before.0, 1, "the switched connection went through the kernel"),
            _ => assert_eq!(after.0, 0, "nothing went through the kernel"),
        }
        // What the switched connection carried counts on its route, once it
        // ended: every byte in user space (the greeting and both pings'
        // echoes included); in the kernel mode, the new process counts from
        // the upgrade on, so at least the bulk each way.
        drop(s);
        let route = format!("http://:{port}");
        let bytes =
            |pm: &Portmux| pm.route(&route).and_then(|r| r.counts).map(|c| (c.bytes_from_clients, c.bytes_to_clients));
        let bulk = up.len() as u64;
        let counted = |b: Option<(u64, u64)>| match mode {
            "kernel" => b.is_some_and(|(from, to)| from >= bulk && to >= bulk),
            _ => b == Some((6 + bulk, 3 + 6 + bulk)),
        };
        pm.wait_for(&format!("{mode}: the switched connection's bytes counted on its route"), |pm| counted(bytes(pm)));
        // Its outcome counts once, where it came in (engine), not again as
        // a forwarded flow where it ended (the new process, in kernel mode).
        let c = pm.route(&route).and_then(|r| r.counts).expect("the route's counts");
        let engine = if mode == "kernel" { 0 } else { 1 };
        assert_eq!((c.forwarded, c.dropped, c.engine), (0, 0, engine), "{mode}: the switched connection's outcome");
    }
}
