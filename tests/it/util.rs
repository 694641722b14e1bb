//! Test harness: the real `portmux` binary, real services (the client crate's
//! `hello` example), temporary directories, free ports, and small HTTP, TLS
//! and raw control-protocol clients.

pub use portmux::admin::AdminAddr;
use portmux::admin::TargetView;
use portmux_sys::scm::Wait;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, channel};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// A directory removed when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
        let dir = std::env::temp_dir().join(format!(
            "portmux-it-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A free TCP port on 127.0.0.1, below the ephemeral range so client sockets
/// cannot take it, chosen at random so parallel test processes do not collide.
pub fn free_port() -> u16 {
    static SEQ: AtomicU32 = AtomicU32::new(0);
    let mut x = std::process::id().wrapping_mul(2654435761)
        ^ SEQ.fetch_add(1, Ordering::Relaxed).wrapping_mul(40503)
        ^ std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    loop {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let port = 20000 + (x % 12000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Where cargo put our binaries (target/debug or target/release).
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_portmux")).parent().unwrap().to_path_buf()
}

/// Path of an example of the client crate, built on first use if missing.
pub fn example(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let path = target_dir().join("examples").join(name);
    if !path.exists() {
        BUILT.get_or_init(|| {
            let release = target_dir().ends_with("release");
            let mut cmd = Command::new(env!("CARGO"));
            cmd.args(["build", "-p", "portmux-client", "--features", "axum", "--examples"]);
            if release {
                cmd.arg("--release");
            }
            let status = cmd.status().expect("run cargo to build the client examples");
            assert!(status.success(), "building the client examples failed");
        });
    }
    assert!(path.exists(), "{} is missing", path.display());
    path
}

/// Output lines of a child, readable with a deadline, and all of stderr kept.
struct Output {
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
    stderr_done: Option<std::thread::JoinHandle<()>>,
}

impl Output {
    /// All of stderr, once the child (and whoever shares its stderr) closed it.
    fn full_stderr(&mut self) -> String {
        if let Some(t) = self.stderr_done.take() {
            let _ = t.join();
        }
        self.stderr.lock().unwrap().clone()
    }
}

fn capture(child: &mut Child) -> Output {
    let (tx, lines) = channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let stderr = Arc::new(Mutex::new(String::new()));
    let sink = stderr.clone();
    let err = child.stderr.take().unwrap();
    let stderr_done = std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let mut s = sink.lock().unwrap();
            s.push_str(&line);
            s.push('\n');
        }
    });
    Output { lines, stderr, stderr_done: Some(stderr_done) }
}

fn wait_line(out: &Output, what: &str, within: Duration) -> Result<String, String> {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match out.lines.recv_timeout(left) {
            Ok(line) if line.contains(what) => return Ok(line),
            Ok(_) => {}
            Err(_) => return Err(out.stderr.lock().unwrap().clone()),
        }
    }
}

fn signal(child: &Child, sig: rustix::process::Signal) {
    if let Some(pid) = rustix::process::Pid::from_raw(child.id() as i32) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

/// Waits for `child` to exit, at most `within`.
fn wait_exit(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A running `portmux run`, stopped (by its PID) when dropped.
pub struct Portmux {
    child: Child,
    out: Output,
    control: PathBuf,
    admin: Option<AdminAddr>,
    /// The process serving now (changes with each upgrade).
    current: u32,
    /// The line it printed once it served.
    ready: String,
    _dir: Option<TempDir>,
}

/// Whether process `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
}

impl Portmux {
    /// Starts portmux with a private control socket, listening on 127.0.0.1.
    pub fn start(extra: &[&str]) -> Portmux {
        let dir = TempDir::new();
        let control = dir.path().join("control.sock");
        Portmux::start_at(&control, extra, Some(dir)).unwrap_or_else(|e| panic!("portmux did not start:\n{e}"))
    }

    /// Starts portmux on a given control path (to restart one in place).
    pub fn start_at(control: &Path, extra: &[&str], dir: Option<TempDir>) -> Result<Portmux, String> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_portmux"));
        cmd.args(["run", "--bind", "127.0.0.1", "--control"]).arg(control).args(extra).env_remove("PORTMUX_CONTROL");
        Portmux::spawn(cmd, control, dir)
    }

    /// Like `start`, with shell `ulimit` settings applied first (e.g. `-n 64`,
    /// or `-Sn 200 -Hn 4000` for soft and hard limits apart).
    pub fn start_with_ulimit(ulimit: &str, extra: &[&str]) -> Portmux {
        let dir = TempDir::new();
        let control = dir.path().join("control.sock");
        let limits: Vec<String> =
            ulimit.split(" -").map(|l| format!("ulimit -{}", l.trim_start_matches('-'))).collect();
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("{} && exec \"$0\" \"$@\"", limits.join(" && ")))
            .arg(env!("CARGO_BIN_EXE_portmux"))
            .args(["run", "--bind", "127.0.0.1", "--control"])
            .arg(&control)
            .args(extra)
            .env_remove("PORTMUX_CONTROL");
        Portmux::spawn(cmd, &control, Some(dir))
            .unwrap_or_else(|e| panic!("portmux (ulimit {ulimit}) did not start:\n{e}"))
    }

    /// Starts a prepared command.
    pub fn spawn(mut cmd: Command, control: &Path, dir: Option<TempDir>) -> Result<Portmux, String> {
        let args: Vec<&std::ffi::OsStr> = cmd.get_args().collect();
        if args.contains(&"run".as_ref()) && !args.contains(&"--state-dir".as_ref()) {
            // Tests keep their state beside their control socket, never in /var/lib.
            cmd.arg("--state-dir").arg(control.with_file_name("state"));
        }
        cmd.env("RUST_LOG", std::env::var("IT_LOG").unwrap_or_else(|_| "info,portmux=debug".into()))
            .env_remove("PORTMUX_ADMIN");
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().map_err(|e| e.to_string())?;
        let out = capture(&mut child);
        let current = child.id();
        let mut pm = Portmux {
            child,
            out,
            control: control.to_path_buf(),
            admin: None,
            current,
            ready: String::new(),
            _dir: dir,
        };
        match wait_line(&pm.out, " ready: ", Duration::from_secs(10)) {
            Ok(line) => {
                pm.admin = admin_from_ready(&line);
                pm.ready = line;
                Ok(pm)
            }
            Err(_) => {
                let status = wait_exit(&mut pm.child, Duration::from_secs(2));
                let stderr = if status.is_some() { pm.out.full_stderr() } else { pm.log() };
                Err(format!("{}\n{stderr}", exit_text(status)))
            }
        }
    }

    /// The line portmux printed once it served.
    pub fn ready_line(&self) -> &str {
        &self.ready
    }

    pub fn control(&self) -> &Path {
        &self.control
    }

    /// The admin API's address (its socket, or the TCP address if it has only that).
    pub fn admin(&self) -> &AdminAddr {
        self.admin.as_ref().expect("this portmux runs no admin API")
    }

    /// The pid of the process serving now.
    pub fn pid(&self) -> u32 {
        self.current
    }

    /// `portmux upgrade ARGS…`; on success follows the new process.
    pub fn upgrade(&mut self, args: &[&str]) -> Result<u32, String> {
        let out = Command::new(env!("CARGO_BIN_EXE_portmux"))
            .arg("upgrade")
            .arg("--control")
            .arg(&self.control)
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        if !out.status.success() {
            return Err(format!("{}\n{stderr}", exit_text(Some(out.status))));
        }
        let pid =
            stdout.rsplit("pid ").next().and_then(|p| p.trim().parse().ok()).ok_or(format!("no pid in {stdout}"))?;
        self.current = pid;
        Ok(pid)
    }

    /// Everything portmux logged so far.
    pub fn log(&self) -> String {
        self.out.stderr.lock().unwrap().clone()
    }

    /// Waits until the log contains `what`.
    pub fn wait_log(&self, what: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.log().contains(what) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// How many times the log contains `what`.
    pub fn count(&self, what: &str) -> usize {
        self.log().matches(what).count()
    }

    /// Every route, from the admin API.
    pub fn routes(&self) -> Vec<portmux::admin::RouteView> {
        let (status, body) = admin(self.admin(), "GET", "/routes", None);
        assert_eq!(status, 200, "GET /routes: {body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        serde_json::from_value(v["routes"].clone()).unwrap()
    }

    /// The route shown as `route` (its canonical spec), if portmux has it.
    pub fn route(&self, route: &str) -> Option<portmux::admin::RouteView> {
        self.routes().into_iter().find(|r| r.route == route)
    }

    /// The process as the admin API shows it.
    pub fn status(&self) -> portmux::admin::StatusView {
        let (status, body) = admin(self.admin(), "GET", "/status", None);
        assert_eq!(status, 200, "GET /status: {body}");
        serde_json::from_str(&body).unwrap()
    }

    /// Waits (at most 10 s) until `ready` holds for this portmux, as its admin
    /// API shows it; panics saying `what` did not happen, with the log.
    pub fn wait_for(&self, what: &str, ready: impl Fn(&Portmux) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ready(self) {
            assert!(Instant::now() < deadline, "{what} did not happen within 10 s:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until `route`'s queue holds `n` connections.
    pub fn wait_queued(&self, route: &str, n: usize) {
        self.wait_for(&format!("{n} connections queued on {route}"), |pm| queued(pm.route(route).as_ref()) == Some(n));
    }

    /// Waits until `route` has `n` instances registered.
    pub fn wait_instances(&self, route: &str, n: usize) {
        self.wait_for(&format!("{n} instances on {route}"), |pm| instances(pm.route(route).as_ref()) == Some(n));
    }

    /// Waits until `route` is reserved (its service left; connections queue).
    pub fn wait_reserved(&self, route: &str) {
        self.wait_for(&format!("{route} reserved"), |pm| {
            matches!(pm.route(route).map(|r| r.target), Some(TargetView::Service { reserved_for_s: Some(_), .. }))
        });
    }

    /// Waits until portmux no longer has `route`.
    pub fn wait_gone(&self, route: &str) {
        self.wait_for(&format!("{route} released"), |pm| pm.route(route).is_none());
    }

    /// Whether portmux listens on `port` (as its status says).
    pub fn listens_on(&self, port: u16) -> bool {
        self.status().listeners.iter().any(|l| l.addr.ends_with(&format!(":{port}")))
    }

    /// From now on, `pid` is the process serving (after a SIGUSR2 upgrade).
    pub fn follow(&mut self, pid: u32) {
        self.current = pid;
    }

    /// Sends `sig` to the process serving now.
    pub fn signal(&self, sig: rustix::process::Signal) {
        if let Some(pid) = rustix::process::Pid::from_raw(self.current as i32) {
            let _ = rustix::process::kill_process(pid, sig);
        }
    }

    /// SIGTERM, then waits for the exit (of the first process; after an
    /// upgrade, use `signal` and `alive`).
    pub fn terminate(&mut self, within: Duration) -> Option<ExitStatus> {
        signal(&self.child, rustix::process::Signal::TERM);
        wait_exit(&mut self.child, within)
    }

    /// SIGKILL to the process serving now (and the first one), reaped.
    pub fn kill(&mut self) {
        self.signal(rustix::process::Signal::KILL);
        signal(&self.child, rustix::process::Signal::KILL);
        let _ = self.child.wait();
    }

    pub fn is_running(&mut self) -> bool {
        if self.current != self.child.id() {
            return alive(self.current);
        }
        self.child.try_wait().is_ok_and(|s| s.is_none())
    }
}

impl Drop for Portmux {
    fn drop(&mut self) {
        if self.is_running() || self.child.try_wait().is_ok_and(|s| s.is_none()) {
            self.kill();
        }
    }
}

/// How many connections a service's route has queued.
pub fn queued(route: Option<&portmux::admin::RouteView>) -> Option<usize> {
    match route.map(|r| &r.target) {
        Some(TargetView::Service { queued, .. }) => Some(*queued),
        _ => None,
    }
}

/// How many of a service's queued clients shut down their sending side.
pub fn half_closed(route: Option<&portmux::admin::RouteView>) -> Option<usize> {
    match route.map(|r| &r.target) {
        Some(TargetView::Service { half_closed, .. }) => Some(*half_closed),
        _ => None,
    }
}

/// How many instances a service's route has.
pub fn instances(route: Option<&portmux::admin::RouteView>) -> Option<usize> {
    match route.map(|r| &r.target) {
        Some(TargetView::Service { instances, .. }) => Some(instances.len()),
        _ => None,
    }
}

/// A service process: the client crate's `hello` example.
pub struct Service {
    child: Child,
    out: Output,
}

impl Service {
    /// Starts `hello SPEC BODY ARGS…` against `pm` and waits until it registered.
    pub fn hello(pm: &Portmux, spec: &str, body: &str, args: &[&str]) -> Service {
        Service::try_hello(pm.control(), spec, body, args).unwrap_or_else(|e| panic!("hello {spec} failed:\n{e}"))
    }

    /// Like `hello`, but returns the service's error output if it fails to register.
    pub fn try_hello(control: &Path, spec: &str, body: &str, args: &[&str]) -> Result<Service, String> {
        let mut cmd = Command::new(example("hello"));
        cmd.arg(spec).arg(body).args(args);
        Service::spawn(cmd, control, "registered")
    }

    /// Starts any command as a service (with PORTMUX_CONTROL set) and waits
    /// for `ready` on its stdout.
    pub fn spawn(mut cmd: Command, control: &Path, ready: &str) -> Result<Service, String> {
        cmd.env("PORTMUX_CONTROL", control).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| e.to_string())?;
        let out = capture(&mut child);
        let mut svc = Service { child, out };
        match wait_line(&svc.out, ready, Duration::from_secs(20)) {
            Ok(_) => Ok(svc),
            Err(_) => {
                let status = wait_exit(&mut svc.child, Duration::from_secs(3));
                let stderr = if status.is_some() { svc.out.full_stderr() } else { svc.stderr() };
                Err(format!("{}\n{stderr}", exit_text(status)))
            }
        }
    }

    pub fn stderr(&self) -> String {
        self.out.stderr.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL (a crash), reaped.
    pub fn kill(&mut self) {
        signal(&self.child, rustix::process::Signal::KILL);
        let _ = self.child.wait();
    }

    /// Waits for the service to exit by itself.
    pub fn wait(&mut self, within: Duration) -> Option<ExitStatus> {
        wait_exit(&mut self.child, within)
    }

    /// SIGTERM (a graceful stop), waited for.
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        signal(&self.child, rustix::process::Signal::TERM);
        wait_exit(&mut self.child, Duration::from_secs(10))
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if self.child.try_wait().is_ok_and(|s| s.is_none()) {
            self.kill();
        }
    }
}

/// Describes how a child ended, for assertions.
pub fn exit_text(status: Option<ExitStatus>) -> String {
    match status {
        Some(s) if s.code().is_some() => format!("exit code {}", s.code().unwrap()),
        Some(s) => format!("signal {:?}", s.signal()),
        None => "still running".into(),
    }
}

/// An HTTP response.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub head: String,
    pub body: String,
}

/// Reads one response (Content-Length framed, or to EOF) from `s`.
pub fn read_response(s: &mut impl Read) -> std::io::Result<Response> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("connection closed after {:?}", String::from_utf8_lossy(&buf)),
            ));
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let length = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>()))
        .transpose()
        .ok()
        .flatten();
    let mut body = Vec::new();
    match length {
        Some(n) => {
            body.resize(n, 0);
            s.read_exact(&mut body)?;
        }
        None => {
            s.read_to_end(&mut body)?;
        }
    }
    Ok(Response { status, head, body: String::from_utf8_lossy(&body).into_owned() })
}

/// An HTTP/1.1 client on one (keep-alive) connection.
pub struct Http {
    pub stream: TcpStream,
}

impl Http {
    pub fn connect(port: u16) -> Http {
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Http { stream }
    }

    pub fn get(&mut self, host: &str, path: &str) -> std::io::Result<Response> {
        write!(self.stream, "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: portmux-it\r\n\r\n")?;
        read_response(&mut self.stream)
    }
}

/// One GET on a new connection.
pub fn get(port: u16, host: &str, path: &str) -> std::io::Result<Response> {
    Http::connect(port).get(host, path)
}

/// Sends raw bytes on a new connection and reads until the server closes.
pub fn raw_exchange(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

/// Runs `curl ARGS` and returns its stdout; panics with stderr on failure.
pub fn curl(args: &[&str]) -> String {
    let out = Command::new("curl").args(["-sS", "--max-time", "20"]).args(args).output().expect("curl is installed");
    assert!(out.status.success(), "curl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A test CA and leaf certificates, written as PEM files.
pub struct Pki {
    pub ca_pem: PathBuf,
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
    dir: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "portmux test CA");
        let key = rcgen::KeyPair::generate().unwrap();
        std::fs::write(dir.join("ca.key"), key.serialize_pem()).unwrap();
        let ca = rcgen::CertifiedIssuer::self_signed(params, key).unwrap();
        let ca_pem = dir.join("ca.pem");
        std::fs::write(&ca_pem, ca.pem()).unwrap();
        Pki { ca_pem, ca, dir: dir.to_path_buf() }
    }

    /// Issues a certificate for `name`; returns (cert.pem, key.pem).
    pub fn leaf(&self, name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap().signed_by(&key, &self.ca).unwrap();
        let (c, k) = (self.dir.join(format!("{name}.crt")), self.dir.join(format!("{name}.key")));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c.to_string_lossy().into_owned(), k.to_string_lossy().into_owned())
    }

    /// The CA certificate (DER).
    pub fn ca_der(&self) -> rustls::pki_types::CertificateDer<'static> {
        self.ca.der().clone()
    }

    /// A rustls client configuration trusting only this CA.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        client_config(&[self.ca_der()], rustls::DEFAULT_VERSIONS, None)
    }
}

/// A rustls client configuration (ALPN `http/1.1`) trusting `roots`, offering
/// `versions`, and presenting `client` (chain, key) when a server asks.
pub fn client_config(
    roots: &[rustls::pki_types::CertificateDer<'static>],
    versions: &[&'static rustls::SupportedProtocolVersion],
    client: Option<(Vec<rustls::pki_types::CertificateDer<'static>>, rustls::pki_types::PrivateKeyDer<'static>)>,
) -> Arc<rustls::ClientConfig> {
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store.add(root.clone()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(store);
    let mut cfg = match client {
        None => builder.with_no_client_auth(),
        Some((chain, key)) => builder.with_client_auth_cert(chain, key).unwrap(),
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// GET over TLS with SNI `sni`, verifying the server's certificate for `sni`.
/// The ClientHello is cut into records of `record` bytes sent in TCP segments of
/// `segment` bytes (0 = as rustls writes it).
pub fn tls_get(
    cfg: Arc<rustls::ClientConfig>,
    port: u16,
    sni: &str,
    path: &str,
    split: Option<(usize, usize)>,
) -> Result<Response, String> {
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
    let mut conn = rustls::ClientConnection::new(cfg, name).unwrap();
    let mut sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    sock.set_nodelay(true).unwrap();
    if let Some((record, segment)) = split {
        let mut hello = Vec::new();
        conn.write_tls(&mut hello).unwrap();
        let bytes = refragment(&hello, record);
        for chunk in bytes.chunks(segment.max(1)) {
            sock.write_all(chunk).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    write!(tls, "GET {path} HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n").map_err(|e| e.to_string())?;
    read_response(&mut tls).map_err(|e| e.to_string())
}

/// Re-cuts the handshake record(s) at the start of `bytes` into records of `size` bytes.
pub fn refragment(bytes: &[u8], size: usize) -> Vec<u8> {
    let len = u16::from_be_bytes([bytes[3], bytes[4]]) as usize;
    let mut out = Vec::new();
    for chunk in bytes[5..5 + len].chunks(size) {
        out.extend_from_slice(&[22, 3, 1]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out.extend_from_slice(&bytes[5 + len..]);
    out
}

/// A raw control-protocol session, for tests that must misbehave or stall.
pub struct RawSession {
    pub fd: std::os::fd::OwnedFd,
    /// Messages that came before Registered (a queued connection may be
    /// delivered as soon as the registration takes effect), for `recv`.
    early: std::cell::RefCell<std::collections::VecDeque<(portmux_wire::Message, Option<std::os::fd::OwnedFd>)>>,
}

impl RawSession {
    pub fn connect(control: &Path) -> RawSession {
        let fd = portmux_sys::net::seqpacket_connect(control, false).unwrap();
        rustix::net::sockopt::set_socket_timeout(
            &fd,
            rustix::net::sockopt::Timeout::Recv,
            Some(Duration::from_secs(20)),
        )
        .unwrap();
        RawSession { fd, early: Default::default() }
    }

    pub fn send_bytes(&self, bytes: &[u8]) -> std::io::Result<()> {
        portmux_sys::scm::send_datagram(self.fd.as_fd(), bytes, Wait::Block)
    }

    /// Sends bytes with an fd attached (which services must never do).
    pub fn send_with_fd(&self, bytes: &[u8], fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()> {
        portmux_sys::scm::send_with_fds(self.fd.as_fd(), bytes, &[fd], Wait::Block)
    }

    pub fn send(&self, msg: &portmux_wire::Message) {
        self.send_bytes(&portmux_wire::encode(msg).unwrap()).unwrap();
    }

    /// Hello and Register; panics unless portmux answers Registered.
    pub fn register(control: &Path, service: &str, routes: &[&str]) -> RawSession {
        let s = RawSession::connect(control);
        s.send(&portmux_wire::Message::Hello { version: portmux_wire::PROTOCOL_VERSION, service: service.into() });
        s.send(&portmux_wire::Message::Register { routes: routes.iter().map(|r| r.to_string()).collect() });
        loop {
            match s.recv_socket() {
                Some((portmux_wire::Message::Registered { .. }, _)) => return s,
                // As the client libraries do: kept for the test's next recv.
                Some(
                    early @ (
                        portmux_wire::Message::Connection { .. }
                        | portmux_wire::Message::TlsConnection { .. }
                        | portmux_wire::Message::Lend { .. },
                        _,
                    ),
                ) => {
                    s.early.borrow_mut().push_back(early);
                }
                other => panic!("expected Registered, got {other:?}"),
            }
        }
    }

    /// The next message and its fd; `None` at end-of-file.
    pub fn recv(&self) -> Option<(portmux_wire::Message, Option<std::os::fd::OwnedFd>)> {
        if let Some(early) = self.early.borrow_mut().pop_front() {
            return Some(early);
        }
        self.recv_socket()
    }

    /// The next message on the socket itself.
    fn recv_socket(&self) -> Option<(portmux_wire::Message, Option<std::os::fd::OwnedFd>)> {
        let mut buf = vec![0u8; 70000];
        let dg = portmux_sys::scm::recv_with_fds(&self.fd, &mut buf, Wait::Block).ok()?;
        assert!(!dg.truncated && !dg.fds_truncated, "portmux sent a datagram this test cannot take: {dg:?}");
        if dg.len == 0 {
            return None;
        }
        Some((portmux_wire::decode(&buf[..dg.len]).unwrap(), dg.fds.into_iter().next()))
    }
}

/// Connects a client and checks the connection is open (portmux accepted it).
pub fn client(port: u16) -> TcpStream {
    let s = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port))).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// Reads until EOF or error and says which: `Ok(bytes)` on a clean FIN,
/// `Err(kind)` on a reset or timeout.
pub fn read_until_close(s: &mut TcpStream) -> Result<Vec<u8>, std::io::ErrorKind> {
    let mut out = Vec::new();
    s.read_to_end(&mut out).map(|_| out).map_err(|e| e.kind())
}

impl Service {
    /// Starts `hello --listen 127.0.0.1:0 BODY ARGS…` (a plain backend, no portmux)
    /// and returns it with the address it listens on.
    pub fn backend(body: &str, args: &[&str]) -> (Service, SocketAddr) {
        Service::backend_on("127.0.0.1:0", body, args)
    }

    /// Like `backend`, on a given address (to bring one back where it was).
    pub fn backend_on(listen: &str, body: &str, args: &[&str]) -> (Service, SocketAddr) {
        let mut cmd = Command::new(example("hello"));
        cmd.args(["--listen", listen, body]).args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let out = capture(&mut child);
        let line = wait_line(&out, "listening on", Duration::from_secs(20)).expect("hello --listen starts");
        let addr = line.rsplit(' ').next().unwrap().parse().unwrap();
        (Service { child, out }, addr)
    }
}

/// `portmux ARGS…` against `pm`'s admin API: (success, stdout, stderr).
pub fn portmux_cli(pm: &Portmux, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_portmux"))
        .args(args)
        .args(["--admin", &pm.admin().to_string()])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The admin API a ready line names first (the socket, then a TCP address).
pub fn admin_from_ready(line: &str) -> Option<AdminAddr> {
    let first = line.split("admin API ").nth(1)?.split(';').next()?.split(' ').next()?;
    let first = first.strip_prefix("http://").unwrap_or(first);
    Some(AdminAddr::parse(first, None))
}

/// The TCP admin address a ready line names.
pub fn tcp_admin_from_ready(line: &str) -> Option<SocketAddr> {
    line.split("http://").nth(1)?.split([';', ' ']).next()?.parse().ok()
}

/// One request to the admin API: (status, body).
pub fn admin(addr: &AdminAddr, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    portmux::admin::request(addr, method, path, body).unwrap()
}

/// A TCP backend in this process: greets each connection with its name and a
/// newline, then echoes until end-of-file (and half-closes after it). With
/// `proxy`, it first reads and records a PROXY header.
pub struct TestBackend {
    pub addr: SocketAddr,
    pub headers: Arc<Mutex<Vec<Vec<u8>>>>,
    _rt: tokio::runtime::Runtime,
}

impl TestBackend {
    pub fn start(name: &str, proxy: bool) -> TestBackend {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let headers = Arc::new(Mutex::new(Vec::new()));
        let (h, greeting) = (headers.clone(), format!("{name}\n"));
        rt.spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            loop {
                let Ok((mut s, _)) = listener.accept().await else { continue };
                let (h, greeting) = (h.clone(), greeting.clone());
                tokio::spawn(async move {
                    if proxy {
                        let mut header = Vec::new();
                        let mut b = [0u8; 1];
                        // v1 ends with CRLF; v2 has its length at bytes 14-15.
                        while s.read_exact(&mut b).await.is_ok() {
                            header.push(b[0]);
                            let v2_done = header.len() >= 16
                                && header.starts_with(b"\r\n\r\n\0\r\nQUIT\n")
                                && header.len() == 16 + u16::from_be_bytes([header[14], header[15]]) as usize;
                            if header.ends_with(b"\r\n") && header.starts_with(b"PROXY") || v2_done {
                                break;
                            }
                        }
                        h.lock().unwrap().push(header);
                    }
                    if s.write_all(greeting.as_bytes()).await.is_err() {
                        return;
                    }
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
        TestBackend { addr, headers, _rt: rt }
    }
}

/// Connects to `port`, reads the backend's greeting line, and returns both.
pub fn greeted(port: u16) -> (TcpStream, String) {
    let mut s = client(port);
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap_or(0) == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    (s, String::from_utf8_lossy(&line).into_owned())
}

/// The number of threads of process `pid`.
pub fn thread_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map(|d| d.count()).unwrap_or(0)
}

/// The number of open fds of process `pid`.
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// Waits until `pid` has at most `n` fds open; returns the last count.
pub fn wait_fds_at_most(pid: u32, n: usize, within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let now = fd_count(pid);
        if now <= n || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A backend on a loopback port: each connection is handled by `handle` on
/// its own thread. Returns its address and the count of connections so far.
pub fn spawn_backend(
    handle: impl Fn(TcpStream) + Send + Sync + 'static,
) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let conns = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (count, handle) = (conns.clone(), Arc::new(handle));
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            count.fetch_add(1, Ordering::Relaxed);
            let handle = handle.clone();
            std::thread::spawn(move || handle(s));
        }
    });
    (addr, conns)
}

/// The first request in `buf` if all of it is there (head and
/// Content-Length body): its head, and its whole length.
pub fn whole_request(buf: &[u8]) -> Option<(String, usize)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let length = head
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    (buf.len() >= end + length).then_some((head, end + length))
}
