//! portmux under systemd: socket activation of the control socket and public
//! ports (systemd-socket-activate), the fd store across a crash (a stand-in
//! service manager that restarts portmux like Restart=always), and the units.

use crate::util::*;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// The stand-in service manager running `portmux run ARGS…`.
struct Manager {
    child: Child,
    seen: Arc<Mutex<Vec<String>>>,
    log: Arc<Mutex<String>>,
}

impl Manager {
    fn start(args: &[&str]) -> Manager {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/fixtures/fake_systemd.py");
        let mut child = Command::new("python3")
            .arg(script)
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_portmux"))
            .args(args)
            .env("RUST_LOG", "info,portmux=debug")
            .env_remove("PORTMUX_CONTROL")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 runs the stand-in service manager");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let record = seen.clone();
        thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                record.lock().unwrap().push(line);
            }
        });
        let log = Arc::new(Mutex::new(String::new()));
        let err = child.stderr.take().unwrap();
        let sink = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        Manager { child, seen, log }
    }

    /// Waits until a line containing `what` was seen (at any time), and returns
    /// the latest such line.
    fn wait(&self, what: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(line) = self.seen.lock().unwrap().iter().rev().find(|l| l.contains(what)) {
                return line.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no {what:?}; saw {:?}\n{}",
                self.seen.lock().unwrap(),
                self.log.lock().unwrap()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for a line containing `what` seen after `count` earlier ones.
    fn wait_nth(&self, what: &str, n: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let lines: Vec<String> = self.seen.lock().unwrap().iter().filter(|l| l.contains(what)).cloned().collect();
            if lines.len() >= n {
                return lines[n - 1].clone();
            }
            assert!(Instant::now() < deadline, "no {what:?} #{n}; saw {:?}", self.seen.lock().unwrap());
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn saw(&self, what: &str) -> bool {
        self.seen.lock().unwrap().iter().any(|l| l.contains(what))
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        // Closing stdin makes it kill the service and exit.
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

fn pid_of(line: &str) -> u32 {
    line.rsplit('=').next().unwrap().trim().parse().unwrap()
}

/// New connections, one request each, until `stop`; records (started, error).
fn requests(
    port: u16,
    body: &'static str,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<Vec<(Instant, Option<String>)>> {
    thread::spawn(move || {
        let mut out = Vec::new();
        while !stop.load(Ordering::Relaxed) && out.len() < 50_000 {
            let started = Instant::now();
            let result =
                TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}")).and_then(|mut s| {
                    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                        .map_err(|e| format!("write: {e}"))?;
                    let r = read_response(&mut s).map_err(|e| format!("read: {e}"))?;
                    if r.status == 200 && r.body == body { Ok(()) } else { Err(format!("{} {:?}", r.status, r.body)) }
                });
            out.push((started, result.err()));
        }
        out
    })
}

#[test]
fn after_a_crash_systemd_restarts_portmux_and_no_queued_connection_is_lost() {
    let dir = TempDir::new();
    let control = dir.path().join("control.sock");
    let control_arg = control.to_str().unwrap();
    let state = dir.path().join("state");
    let state = state.to_str().unwrap();
    let manager = Manager::start(&["run", "--bind", "127.0.0.1", "--control", control_arg, "--state-dir", state]);
    let first = pid_of(&manager.wait("STARTED pid="));
    let ready = manager.wait(" ready: ");
    let admin_addr = admin_from_ready(&ready).unwrap();
    manager.wait("READY");
    manager.wait("FDSTORE name=control-stored");
    manager.wait("FDSTORE name=state");

    let (handoff, forward) = (free_port(), free_port());
    let _svc = Service::try_hello(&control, &format!("http://:{handoff}"), "svc", &[]).unwrap();
    let (_backend, backend) = Service::backend("fwd", &[]);
    let body = format!(r#"{{"route": "http://:{forward}", "backends": ["{backend}"]}}"#);
    assert_eq!(admin(&admin_addr, "POST", "/routes", Some(&body)).0, 200);
    manager.wait(&format!("FDSTORE name=tcp-127.0.0.1-{handoff}"));
    manager.wait(&format!("FDSTORE name=tcp-127.0.0.1-{forward}"));

    let stop = Arc::new(AtomicBool::new(false));
    let loads = [requests(handoff, "svc", stop.clone()), requests(forward, "fwd", stop.clone())];
    thread::sleep(Duration::from_millis(300));
    rustix::process::kill_process(rustix::process::Pid::from_raw(first as i32).unwrap(), rustix::process::Signal::KILL)
        .unwrap();
    // Until it is really gone, the dying process may still take a connection.
    while alive(first) {
        thread::sleep(Duration::from_millis(1));
    }
    let killed = Instant::now();
    let second = pid_of(&manager.wait("RESTARTED pid="));
    assert_ne!(first, second);
    manager.wait_nth("READY", 2);
    thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Relaxed);
    for (load, route) in loads.into_iter().zip(["handoff", "forward"]) {
        let results = load.join().unwrap();
        let refused: Vec<_> =
            results.iter().filter_map(|(_, e)| e.as_ref()).filter(|e| e.starts_with("connect")).collect();
        assert!(refused.is_empty(), "{route}: no connection is refused: {refused:?}");
        // Requests in flight inside the killed process may fail; every one
        // started after the kill (queued by the kernel meanwhile) is served.
        let after: Vec<_> = results.iter().filter(|(t, _)| *t > killed).collect();
        let failed: Vec<_> = after.iter().filter_map(|(_, e)| e.as_ref()).collect();
        assert!(failed.is_empty(), "{route}: every connection made after the crash is served: {failed:?}");
        assert!(after.len() >= 20, "{route}: the load went on after the crash ({})", after.len());
    }
    let log = manager.log.lock().unwrap().clone();
    assert!(log.contains("adopted the control socket from systemd"), "{log}");
    assert!(log.contains("restored the routes kept in the fd store"), "{log}");
    assert!(manager.saw("RESTARTED"));
}

/// portmux started by two nested `systemd-socket-activate`s, as two socket
/// units would: the control socket (SEQPACKET) and one public port, each
/// activated on its first connection and passed through, and a service
/// (`hello`) whose registration activated them. Stopped (by PID) when dropped.
struct Activated {
    activator: Child,
    log: Arc<Mutex<String>>,
    control: std::path::PathBuf,
    port: u16,
    svc: Option<Service>,
    /// The admin client whose connection activated the admin socket.
    early_admin: Option<std::os::unix::net::UnixStream>,
    /// The admin API of the serving portmux, as its ready line says.
    pm_admin: AdminAddr,
    _dir: TempDir,
}

impl Activated {
    fn start() -> Activated {
        let dir = TempDir::new();
        let control = dir.path().join("control.sock");
        let admin_sock = dir.path().join("admin.sock");
        let port = free_port();
        let control_arg = control.to_str().unwrap();
        let listen = format!("127.0.0.1:{port}");
        let mut cmd = Command::new("systemd-socket-activate");
        cmd.args(["--seqpacket", "-l", control_arg, "--fdname=control"])
            .args(["systemd-socket-activate", "-l", admin_sock.to_str().unwrap(), "--fdname=admin"])
            .args(["systemd-socket-activate", "-l", &listen])
            .args(["--fdname=web", env!("CARGO_BIN_EXE_portmux"), "run", "--bind", "127.0.0.1", "--linger", "1s"])
            .args(["--control", control_arg])
            .arg("--state-dir")
            .arg(control.with_file_name("state"))
            .env("RUST_LOG", "info,portmux=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut activator = cmd.spawn().expect("systemd-socket-activate is installed (package systemd)");
        let log = Arc::new(Mutex::new(String::new()));
        let streams: [std::fs::File; 2] = [
            std::os::fd::OwnedFd::from(activator.stdout.take().unwrap()).into(),
            std::os::fd::OwnedFd::from(activator.stderr.take().unwrap()).into(),
        ];
        for stream in streams {
            let sink = log.clone();
            thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    sink.lock().unwrap().push_str(&(line + "\n"));
                }
            });
        }
        let wait_log = |what: &str| {
            let deadline = Instant::now() + Duration::from_secs(20);
            while !log.lock().unwrap().contains(what) {
                assert!(Instant::now() < deadline, "no {what:?} in {}", log.lock().unwrap());
                thread::sleep(Duration::from_millis(10));
            }
        };
        wait_log("Listening on");
        // The service's connection activates the control socket; a first client,
        // the public port; then portmux starts with both.
        let svc = thread::spawn({
            let control = control.clone();
            move || Service::try_hello(&control, &format!("http://:{port}"), "activated", &[])
        });
        wait_log("Communication attempt");
        // An admin client activates the admin socket (it waits in its backlog for portmux).
        let deadline = Instant::now() + Duration::from_secs(10);
        let early_admin = loop {
            match std::os::unix::net::UnixStream::connect(&admin_sock) {
                Ok(s) => break s,
                Err(_) => assert!(Instant::now() < deadline, "the admin socket listens"),
            }
            thread::sleep(Duration::from_millis(20));
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the public port listens");
            thread::sleep(Duration::from_millis(20));
        }
        wait_log("ready:");
        let svc = svc.join().unwrap().unwrap_or_else(|e| panic!("{e}\n{}", log.lock().unwrap()));
        let pm_admin = admin_from_ready(&log.lock().unwrap()).expect("the ready line names the admin API");
        Activated { activator, log, control, port, svc: Some(svc), pm_admin, early_admin: Some(early_admin), _dir: dir }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The listeners of the serving portmux: (port, pinned).
    fn listeners(&self) -> Vec<(u16, bool)> {
        let (_, body) = admin(&self.pm_admin, "GET", "/status", None);
        let status: portmux::admin::StatusView = serde_json::from_str(&body).unwrap();
        status.listeners.iter().map(|l| (l.addr.rsplit(':').next().unwrap().parse().unwrap(), l.pinned)).collect()
    }

    /// The activated service leaves, and so does one on another port that
    /// portmux opened on demand (a witness). Once the witness's listener has
    /// closed (a linger period after its route was released), the activated
    /// port's would have too, were it not systemd's: it must still listen.
    fn check_the_activated_listener_outlives_its_routes(&mut self) {
        let witness_port = free_port();
        let mut witness =
            Service::try_hello(&self.control, &format!("http://:{witness_port}"), "witness", &[]).unwrap();
        assert!(self.listeners().contains(&(witness_port, false)), "{:?}", self.listeners());
        if let Some(mut svc) = self.svc.take() {
            svc.kill();
        }
        witness.kill();
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.listeners().iter().any(|(p, _)| *p == witness_port) {
            assert!(Instant::now() < deadline, "the witness's listener closes after the linger period\n{}", self.log());
            thread::sleep(Duration::from_millis(20));
        }
        assert!(self.listeners().contains(&(self.port, true)), "{:?}\n{}", self.listeners(), self.log());
        assert_eq!(get(self.port, "x", "/").unwrap().status, 404, "still listening, with no route");
    }
}

impl Activated {
    /// SIGTERM to the activator (which passes it on) and, after an upgrade,
    /// to the process serving now; waits for both to exit.
    fn stop(&mut self) {
        let serving = admin_status_pid(&self.pm_admin);
        if let Ok(None) = self.activator.try_wait()
            && let Some(pid) = rustix::process::Pid::from_raw(self.activator.id() as i32)
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        let _ = self.activator.wait();
        if let Some(pid) = serving.filter(|p| *p != self.activator.id())
            && let Some(raw) = rustix::process::Pid::from_raw(pid as i32)
        {
            let _ = rustix::process::kill_process(raw, rustix::process::Signal::TERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while alive(pid) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// The pid the admin API says serves, if it answers.
fn admin_status_pid(addr: &AdminAddr) -> Option<u32> {
    let (_, body) = portmux::admin::request(addr, "GET", "/status", None).ok()?;
    serde_json::from_str::<portmux::admin::StatusView>(&body).ok().map(|s| s.pid)
}

impl Drop for Activated {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
fn socket_activation_passes_the_control_socket_and_the_public_ports() {
    let mut activated = Activated::start();
    assert_eq!(get(activated.port, "x", "/").unwrap().body, "activated");
    let text = activated.log();
    // (The inner activator names every fd it passes "web"; portmux tells them apart by type.)
    assert!(text.contains("adopted the control socket from systemd"), "{text}");
    assert!(text.contains("adopted the admin socket from systemd"), "{text}");
    // The admin client that was waiting in the socket unit's backlog is answered.
    let mut early = activated.early_admin.take().unwrap();
    early.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    early.write_all(b"GET /status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").unwrap();
    assert_eq!(read_response(&mut early).unwrap().status, 200);
    let admin_sock = activated.control.with_file_name("admin.sock");
    assert!(
        text.contains(&format!(
            "adopted a listening socket from systemd addr=127.0.0.1:{} name=\"web\" pinned=true",
            activated.port
        )),
        "{text}"
    );
    // The route goes; a socket-activated listener is systemd's: it stays open.
    activated.check_the_activated_listener_outlives_its_routes();
    activated.stop();
    assert!(activated.control.exists(), "a socket unit's control socket is not portmux's to remove");
    assert!(admin_sock.exists(), "nor its admin socket");
}

#[test]
fn socket_activated_listeners_stay_pinned_across_an_upgrade() {
    let mut activated = Activated::start();
    let out = Command::new(env!("CARGO_BIN_EXE_portmux"))
        .args(["upgrade", "--control", activated.control.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "upgrade: {}\n{}", String::from_utf8_lossy(&out.stderr), activated.log());
    assert_eq!(get(activated.port, "x", "/").unwrap().body, "activated", "the new process serves the route");
    assert!(activated.listeners().contains(&(activated.port, true)), "{:?}", activated.listeners());
    activated.check_the_activated_listener_outlives_its_routes();
    // The new process knows the admin socket is the socket unit's: it leaves it.
    activated.stop();
    assert!(activated.control.with_file_name("admin.sock").exists());
}

#[test]
fn the_units_verify_and_their_exposure_is_low() {
    let dir = TempDir::new();
    let units = concat!(env!("CARGO_MANIFEST_DIR"), "/dist/systemd");
    let mut paths = Vec::new();
    for name in ["portmux.service", "portmux.socket", "portmux-control.socket", "portmux-admin.socket"] {
        let text = std::fs::read_to_string(format!("{units}/{name}")).unwrap();
        // verify checks that ExecStart's binary exists: point it at the one just built.
        let text = text.replace("/usr/bin/portmux", env!("CARGO_BIN_EXE_portmux"));
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        paths.push(path);
    }
    let out =
        Command::new("systemd-analyze").arg("verify").args(&paths).output().expect("systemd-analyze is installed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.trim().is_empty(), "systemd-analyze verify: {stderr}");
    let out = Command::new("systemd-analyze").args(["security", "--offline=true"]).arg(&paths[0]).output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    let level: f64 = report
        .lines()
        .find_map(|l| l.split("Overall exposure level for portmux.service: ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in {report}"));
    eprintln!("systemd-analyze security: exposure {level}");
    assert!(level <= 2.0, "exposure {level} is higher than the 1.6 the features allow:\n{report}");
}
