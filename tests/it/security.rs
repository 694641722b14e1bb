//! Security on a shared host: who may claim what (processes of another uid,
//! run with `setpriv`), an admin API that no browser and no other user can
//! drive, and the limits that keep one client from starving the others.

use crate::util::*;
use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// The unprivileged user the tests act as.
pub const NOBODY: u32 = 65534;

/// `program` run as uid and gid 65534, without supplementary groups.
pub fn as_nobody(program: &Path) -> Command {
    let mut cmd = Command::new("setpriv");
    cmd.args([&format!("--reuid={NOBODY}"), &format!("--regid={NOBODY}"), "--clear-groups", "--"]).arg(program);
    cmd
}

/// Lets uid 65534's group use `pm`'s control and admin sockets (as a host
/// admits a user to the portmux group).
pub fn admit_nobody(pm: &Portmux) {
    for sock in [pm.control().to_path_buf(), pm.control().with_file_name("admin.sock")] {
        std::os::unix::fs::chown(&sock, None, Some(NOBODY)).unwrap();
    }
}

/// `hello SPEC BODY` as uid 65534 under service name `name`: registered, or its error output.
fn hello_as_nobody(pm: &Portmux, spec: &str, body: &str, name: &str) -> Result<Service, String> {
    let mut cmd = as_nobody(&example("hello"));
    cmd.args([spec, body, "--name", name]);
    Service::spawn(cmd, pm.control(), "registered")
}

#[test]
fn another_uid_cannot_take_a_route_a_path_a_name_or_a_privileged_port() {
    let pm = Portmux::start(&[]);
    admit_nobody(&pm);
    let port = free_port();
    let held = format!("http://held.test:{port}");
    let _root = Service::hello(&pm, &held, "root's", &["--name", "web"]);

    // The same service name: before, it joined root's pool and got half its clients.
    let e = hello_as_nobody(&pm, &held, "stolen", "web").err().expect("refused");
    assert!(
        e.contains("refused by the ownership rule: the service name 'web' is held by service 'web'")
            && e.contains("uid 0)"),
        "{e}"
    );
    // A more specific path under root's host: before, it got every /login request.
    let e = hello_as_nobody(&pm, &format!("{held}/login"), "stolen", "login").err().expect("refused");
    assert!(e.contains(&format!("the ownership rule: host held.test on port {port} is held by service 'web'")), "{e}");
    // A privileged port: before, it opened port 444.
    // A catch-all on root's port would get held.test's other paths, and names nobody claimed there.
    let e = hello_as_nobody(&pm, &format!("http://:{port}"), "stolen", "catch-all").err().expect("refused");
    assert!(e.contains(&format!("a route on port {port} (http://held.test:{port})")), "{e}");
    let e = hello_as_nobody(&pm, "tcp://127.0.0.1:444", "x", "low").err().expect("refused");
    assert!(e.contains("refused by the default policy") && e.contains("not 444 (a privileged port)"), "{e}");
    assert!(!pm.listens_on(444), "nothing listens on 444");

    // Root's service keeps all its traffic.
    for path in ["/", "/login", "/login/x", "/other"] {
        let r = get(port, "held.test", path).unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "root's"), "{path}");
    }
    // The other uid's own routes work: another host on the same port, and a port of its own.
    let mine = free_port();
    let _a = hello_as_nobody(&pm, &format!("http://nobody.test:{port}"), "nobody's", "nobody-web").unwrap();
    let _b = hello_as_nobody(&pm, &format!("tcp://127.0.0.1:{mine}"), "nobody's tcp", "nobody-tcp").unwrap();
    assert_eq!(get(port, "nobody.test", "/").unwrap().body, "nobody's");
    assert_eq!(get(mine, "any", "/").unwrap().body, "nobody's tcp");
    assert_eq!(get(port, "held.test", "/login").unwrap().body, "root's");
    let owners: Vec<(String, u32)> = pm
        .routes()
        .iter()
        .filter_map(|r| match &r.target {
            portmux::admin::TargetView::Service { service, instances, .. } => {
                Some((service.clone(), instances.first()?.uid))
            }
            _ => None,
        })
        .collect();
    assert!(owners.contains(&("web".into(), 0)) && owners.contains(&("nobody-web".into(), NOBODY)), "{owners:?}");
}

#[test]
fn a_policy_file_names_what_each_user_may_claim() {
    let dir = TempDir::new();
    let (allowed, other) = (free_port(), free_port());
    let policy = dir.path().join("portmux.toml");
    std::fs::write(
        &policy,
        format!(
            "[[policy.rule]]\nuid = {NOBODY}\nports = [{allowed}]\nhosts = [\"*.nobody.test\"]\nservices = [\"nb-*\"]\n"
        ),
    )
    .unwrap();
    let pm = Portmux::start(&["--config", policy.to_str().unwrap()]);
    admit_nobody(&pm);
    let _ok = hello_as_nobody(&pm, &format!("http://a.nobody.test:{allowed}"), "allowed", "nb-a").unwrap();
    assert_eq!(get(allowed, "a.nobody.test", "/").unwrap().body, "allowed");
    for (spec, name, why) in [
        (format!("http://a.nobody.test:{other}"), "nb-b", format!("may claim ports {allowed}, not {other}")),
        (format!("http://elsewhere.test:{allowed}"), "nb-c", "not host elsewhere.test".to_string()),
        (format!("http://b.nobody.test:{allowed}"), "web", "may use service names nb-*, not 'web'".to_string()),
    ] {
        let e = hello_as_nobody(&pm, &spec, "x", name).err().expect("refused");
        assert!(e.contains(&format!("refused by policy rule 1 (uid {NOBODY})")) && e.contains(&why), "{spec}: {e}");
    }

    // A bad file is refused at start with its line and column.
    std::fs::write(&policy, "[[policy.rule]]\nuid = 1\nports = [\"80-\"]\n").unwrap();
    let control = dir.path().join("bad.sock");
    let e = Portmux::start_at(&control, &["--config", policy.to_str().unwrap()], None).err().expect("refused");
    assert!(e.contains("policy rule 1: '80-' is not a port or a range"), "{e}");
    std::fs::write(&policy, "[[policy.rule]]\nuid = 1\nport = 80\n").unwrap();
    let e = Portmux::start_at(&control, &["--config", policy.to_str().unwrap()], None).err().expect("refused");
    assert!(e.contains("line 3, column 1") && e.contains("unknown field `port`"), "{e}");
}

/// One raw HTTP/1.1 request to `port`'s admin API: (status, body).
fn raw_admin(addr: std::net::SocketAddr, head: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "{head}Content-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).unwrap();
    let r = read_response(&mut s).unwrap();
    (r.status, r.body)
}

#[test]
fn the_tcp_admin_api_refuses_what_a_browser_or_a_stranger_sends() {
    let dir = TempDir::new();
    let token_file = dir.path().join("token");
    let token = "3c1d0f5e9a7b4c2e8f6a1d3b5c7e9f0a";
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_portmux"));
    let control = dir.path().join("control.sock");
    cmd.args(["run", "--bind", "127.0.0.1", "--admin", "127.0.0.1:0", "--control"]).arg(&control);
    cmd.arg("--admin-token-file").arg(&token_file);
    let pm = Portmux::spawn(cmd, &control, None).unwrap();
    let tcp = tcp_admin_from_ready(pm.ready_line()).expect("the ready line names the TCP address");
    let (port, backend) = (free_port(), free_port());
    let json = "Content-Type: application/json\r\n";
    let auth = format!("Authorization: Bearer {token}\r\n");
    let route = format!(r#"{{"route": "tcp://:{port}", "backends": ["127.0.0.1:{backend}"]}}"#);
    let post = |extra: &str| raw_admin(tcp, &format!("POST /routes HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}"), &route);

    // The token, a JSON body type and POST make a change.
    assert_eq!(post(&format!("{json}{auth}")).0, 200);
    let backends = |pm: &Portmux| format!("{:?}", pm.route(&format!("tcp://:{port}")).map(|r| r.target));
    let before = backends(&pm);
    assert!(before.contains(&format!("127.0.0.1:{backend}")), "{before}");

    // seamless's GET verbs (an <img> tag can send them) change nothing.
    let (status, body) = raw_admin(tcp, "GET /set?backends=127.0.0.1:1 HTTP/1.1\r\nHost: 127.0.0.1\r\n", "");
    assert!(status == 405 && body.contains("state changes need POST, PUT or DELETE"), "{status} {body}");
    // DNS rebinding: a foreign Host is refused, reads too.
    let (status, body) = raw_admin(tcp, "GET /routes HTTP/1.1\r\nHost: evil.example\r\n", "");
    assert!(status == 421 && body.contains("Host 'evil.example' is not a loopback name"), "{status} {body}");
    // A page's request (Origin, or Sec-Fetch-Site) is refused even with the token.
    let (status, body) = post(&format!("{json}{auth}Origin: http://evil.example\r\n"));
    assert!(status == 403 && body.contains("Origin: http://evil.example"), "{status} {body}");
    let (status, _) = post(&format!("{json}{auth}Sec-Fetch-Site: cross-site\r\n"));
    assert_eq!(status, 403);
    // A form post (no JSON type), a missing or a wrong token.
    assert_eq!(post(&format!("Content-Type: text/plain\r\n{auth}")).0, 415);
    let (status, body) = post(json);
    assert!(status == 401 && body.contains("Authorization: Bearer"), "{status} {body}");
    assert_eq!(post(&format!("{json}Authorization: Bearer wrong\r\n")).0, 401);
    assert_eq!(backends(&pm), before, "nothing refused changed the route");
    // The CLI over TCP: with the token file it may, without it is told what is missing.
    let cli = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_portmux"))
            .args(["route", "add", &format!("tcp://:{port}"), "--backend", "127.0.0.1:7", "--admin", &tcp.to_string()])
            .args(extra)
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (ok, err) = cli(&[]);
    assert!(!ok && err.contains("need Authorization: Bearer TOKEN"), "{err}");
    let (ok, err) = cli(&["--admin-token-file", token_file.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(backends(&pm).contains("127.0.0.1:7"), "{}", backends(&pm));
    assert!(!pm.log().contains(token), "the token is never logged");

    // A non-loopback address needs --admin-public.
    let e = Portmux::start_at(&dir.path().join("public.sock"), &["--admin", "0.0.0.0:0"], None).err().unwrap();
    assert!(e.contains("off loopback") && e.contains("--admin-public"), "{e}");
}

#[test]
fn the_admin_socket_lets_other_users_read_but_not_change_routes() {
    let pm = Portmux::start(&[]);
    admit_nobody(&pm);
    let (port, backend) = (free_port(), free_port());
    let cli = |cmd: &mut Command| {
        let out = cmd.arg("--admin").arg(pm.control().with_file_name("admin.sock")).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let spec = format!("tcp://:{port}");
    let backend = format!("127.0.0.1:{backend}");
    let portmux = Path::new(env!("CARGO_BIN_EXE_portmux"));
    let (ok, out) = cli(as_nobody(portmux).args(["route", "add", &spec, "--backend", &backend]));
    assert!(!ok && out.contains("refused by the default policy") && out.contains("may not change routes"), "{out}");
    assert!(pm.route(&spec).is_none());
    // Root may; then the other user can read what there is.
    let (ok, out) = cli(Command::new(portmux).args(["route", "add", &spec, "--backend", &backend]));
    assert!(ok, "{out}");
    let (ok, out) = cli(as_nobody(portmux).args(["route", "list"]));
    assert!(ok && out.contains(&spec), "{out}");
    let (ok, out) = cli(as_nobody(portmux).args(["route", "remove", &spec]));
    assert!(!ok && out.contains("may not change routes"), "{out}");
    assert!(pm.route(&spec).is_some());
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(pm.control().with_file_name("admin.sock")).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o660);
}

#[test]
fn services_trust_only_a_portmux_of_root_their_own_uid_or_the_one_they_name() {
    let dir = TempDir::new();
    std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY)).unwrap();
    let control = dir.path().join("control.sock");
    let mut cmd = as_nobody(Path::new(env!("CARGO_BIN_EXE_portmux")));
    cmd.args(["run", "--bind", "127.0.0.1", "--control"]).arg(&control);
    let pm = Portmux::spawn(cmd, &control, None).unwrap();
    let port = free_port();
    // A socket another user serves could be anyone's: root's service refuses it.
    let e = Service::try_hello(&control, &format!("http://:{port}"), "x", &[]).err().expect("refused");
    assert!(e.contains(&format!("is served by uid {NOBODY}, neither root nor this process's uid 0")), "{e}");
    assert!(pm.routes().is_empty(), "nothing was registered");
    // Named, it is trusted.
    let mut cmd = Command::new(example("hello"));
    cmd.args([&format!("http://:{port}"), "named"]).env("PORTMUX_DAEMON_UID", NOBODY.to_string());
    let _svc = Service::spawn(cmd, &control, "registered").unwrap();
    assert_eq!(get(port, "x", "/").unwrap().body, "named");
}

#[test]
fn the_fallback_control_directory_must_be_private() {
    let fallback = Path::new("/tmp/portmux-65534");
    let start = || {
        let mut cmd = as_nobody(Path::new(env!("CARGO_BIN_EXE_portmux")));
        cmd.args(["run", "--bind", "127.0.0.1"]).env_remove("XDG_RUNTIME_DIR").env_remove("PORTMUX_CONTROL");
        Portmux::spawn(cmd, &fallback.join("control.sock"), None)
    };
    let _ = std::fs::remove_dir_all(fallback);
    // Someone else made it first (here root, open to all): refused.
    std::fs::create_dir(fallback).unwrap();
    std::fs::set_permissions(fallback, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let e = start().err().expect("refused");
    assert!(e.contains("refusing the control socket's directory /tmp/portmux-65534: it belongs to uid 0"), "{e}");
    // Its own, but open to others: refused too.
    std::os::unix::fs::chown(fallback, Some(NOBODY), Some(NOBODY)).unwrap();
    let e = start().err().expect("refused");
    assert!(e.contains("has mode 777; it must be 700"), "{e}");
    // Missing: created 0700, and used.
    std::fs::remove_dir(fallback).unwrap();
    let pm = start().unwrap();
    let meta = std::fs::metadata(fallback).unwrap();
    assert_eq!(
        (
            std::os::unix::fs::MetadataExt::uid(&meta),
            std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777
        ),
        (NOBODY, 0o700)
    );
    assert!(pm.ready_line().contains("/tmp/portmux-65534/control.sock"), "{}", pm.ready_line());
    drop(pm);
    let _ = std::fs::remove_dir_all(fallback);
}

/// A line of /proc/PID/status.
fn proc_status(pid: u32, field: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines().find_map(|l| l.strip_prefix(field)).unwrap_or_default().trim().to_string()
}

/// A port below 1024 in `range` that nothing listens on (each test its own range).
fn free_privileged_port(range: std::ops::Range<u16>) -> u16 {
    range.clone().find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok()).expect("a free port below 1024")
}

#[test]
fn the_sandbox_is_in_force() {
    let mut pm = Portmux::start(&[]);
    let pid = pm.pid();
    // No new privileges, a seccomp filter, and of root's capabilities only the one to bind low ports.
    assert_eq!(proc_status(pid, "NoNewPrivs:"), "1");
    assert_eq!(proc_status(pid, "Seccomp:"), "2");
    assert_eq!(proc_status(pid, "CapEff:"), "0000000000000400", "CAP_NET_BIND_SERVICE only");
    assert_eq!(proc_status(pid, "CapAmb:"), "0000000000000400");
    let sandbox = pm.status().sandbox.unwrap_or_default();
    assert!(sandbox.contains("landlock enforced") && sandbox.contains("system calls allowed"), "{sandbox}");
    // That one capability is enough to open a privileged port on demand.
    let low = free_privileged_port(900..930);
    let _svc = Service::hello(&pm, &format!("tcp://127.0.0.1:{low}"), "low", &[]);
    assert_eq!(get(low, "x", "/").unwrap().body, "low");

    // Files outside the allowed set cannot be opened from inside portmux: a
    // new binary in a temporary directory cannot even be started.
    let dir = TempDir::new();
    let copy = dir.path().join("portmux");
    std::fs::copy(env!("CARGO_BIN_EXE_portmux"), &copy).unwrap();
    let e = pm.upgrade(&["--binary", copy.to_str().unwrap()]).unwrap_err();
    assert!(e.contains("Permission denied"), "{e}");
    assert_eq!(pm.pid(), pid, "the old process serves on");
    // The binary is fine: a portmux without the sandbox starts it.
    let mut open = Portmux::start(&["--no-sandbox"]);
    assert_eq!(proc_status(open.pid(), "Seccomp:"), "0");
    let new = open.upgrade(&["--binary", copy.to_str().unwrap()]).unwrap();
    assert!(alive(new));

    // An upgrade (from the usual place) keeps the sandbox, inherited, and the capability.
    let next = pm.upgrade(&[]).unwrap();
    assert_eq!((proc_status(next, "Seccomp:"), proc_status(next, "CapEff:")), ("2".into(), "0000000000000400".into()));
    assert!(pm.status().sandbox.unwrap_or_default().contains("inherited"));
    let low2 = free_privileged_port(930..960);
    let _svc2 = Service::hello(&pm, &format!("tcp://127.0.0.1:{low2}"), "low2", &[]);
    assert_eq!(get(low2, "x", "/").unwrap().body, "low2");
}

#[test]
fn started_as_root_with_a_user_it_becomes_that_user() {
    let pm = Portmux::start(&["--user", "nobody"]);
    let pid = pm.pid();
    assert_eq!(proc_status(pid, "Uid:").split_whitespace().collect::<Vec<_>>(), ["65534"; 4]);
    assert_eq!(proc_status(pid, "Groups:"), "");
    assert_eq!(proc_status(pid, "CapEff:"), "0000000000000400");
    let low = free_privileged_port(960..990);
    let _svc = Service::hello(&pm, &format!("tcp://127.0.0.1:{low}"), "as nobody", &[]);
    assert_eq!(get(low, "x", "/").unwrap().body, "as nobody");
    assert!(pm.status().sandbox.unwrap_or_default().starts_with("user nobody (uid 65534)"));
    let e =
        Portmux::start_at(&TempDir::new().path().join("c.sock"), &["--user", "no-such-user-x"], None).err().unwrap();
    assert!(e.contains("no user 'no-such-user-x' in /etc/passwd"), "{e}");
}

#[test]
fn a_rule_for_a_group_applies_to_its_members_as_the_kernel_records_them() {
    let dir = TempDir::new();
    let port = free_port();
    let policy = dir.path().join("portmux.toml");
    // Members of group 4242 (a supplementary group) may claim this port; nobody else may claim anything.
    std::fs::write(&policy, format!("[[policy.rule]]\ngid = 4242\nports = [{port}]\n")).unwrap();
    let pm = Portmux::start(&["--config", policy.to_str().unwrap()]);
    admit_nobody(&pm);
    let hello = |groups: &str, name: &str| {
        let mut cmd = Command::new("setpriv");
        cmd.args([&format!("--reuid={NOBODY}"), &format!("--regid={NOBODY}"), groups, "--"]).arg(example("hello"));
        cmd.args([&format!("http://{name}.test:{port}"), name, "--name", name]);
        Service::spawn(cmd, pm.control(), "registered")
    };
    let _member = hello("--groups=4242", "member").unwrap();
    assert_eq!(get(port, "member.test", "/").unwrap().body, "member");
    let e = hello("--clear-groups", "outsider").err().expect("refused");
    assert!(e.contains(&format!("no [[policy.rule]] applies to uid {NOBODY}")), "{e}");
}

#[test]
fn another_uid_sends_its_certificate_and_may_not_make_portmux_read_files() {
    let dir = TempDir::new();
    let pki = Pki::new(dir.path());
    let pm = Portmux::start(&["--cert-dir", &dir.path().to_string_lossy()]);
    admit_nobody(&pm);
    let port = free_port();
    let spec = format!("https://n.example.test:{port}?cert=/etc/shadow&key=/etc/shadow");
    let e = hello_as_nobody(&pm, &spec, "x", "nb-tls").err().unwrap_or_default();
    assert!(e.contains("only root or portmux's own user may name them") && e.contains(&format!("uid {NOBODY}")), "{e}");
    assert!(!e.contains("PEM") && !e.contains("No such file"), "nothing about the file is told: {e}");
    let (cert, key) = pki.leaf("n.example.test");
    let mut cmd = as_nobody(&example("hello"));
    cmd.args([
        &format!("https://n.example.test:{port}"),
        "from nobody",
        "--name",
        "nb-tls",
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
    ]);
    let _svc =
        Service::spawn(cmd, pm.control(), "registered").expect("its own certificate, sent with the registration");
    let (r, ..) =
        crate::tls::tls_request(pki.client_config(), port, Some("n.example.test"), "", "n.example.test", "/").unwrap();
    assert_eq!(r.body, "from nobody");
}
