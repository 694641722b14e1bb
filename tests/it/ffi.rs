//! libportmux, the C ABI: the C and Python examples serve the walkthrough
//! under the real portmux, the C one also under valgrind and linked
//! statically; the error paths give their codes and leak nothing.

use crate::util::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::Duration;

fn ffi_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("proto/ffi")
}

/// libportmux installed (install.sh, from this build's target dir) into a
/// prefix shared by the tests of this process.
fn prefix() -> &'static Path {
    static PREFIX: OnceLock<TempDir> = OnceLock::new();
    PREFIX
        .get_or_init(|| {
            let target = Path::new(env!("CARGO_BIN_EXE_portmux")).parent().unwrap().to_path_buf();
            let mut build = Command::new(env!("CARGO"));
            build.args(["build", "-p", "portmux-ffi"]);
            if target.ends_with("release") {
                build.arg("--release");
            }
            assert!(build.status().unwrap().success(), "building libportmux failed");
            let dir = TempDir::new();
            let out = Command::new(ffi_dir().join("install.sh"))
                .arg("--prefix")
                .arg(dir.path())
                .arg("--from")
                .arg(&target)
                .output()
                .unwrap();
            assert!(out.status.success(), "install.sh: {}", String::from_utf8_lossy(&out.stderr));
            dir
        })
        .path()
}

fn pkg_config(args: &[&str]) -> Vec<String> {
    let out = Command::new("pkg-config")
        .args(args)
        .arg("portmux")
        .env("PKG_CONFIG_PATH", prefix().join("lib/pkgconfig"))
        .output()
        .expect("pkg-config is installed (scripts/test installs it)");
    assert!(out.status.success(), "pkg-config {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().split_whitespace().map(String::from).collect()
}

/// Compiles a C program against the installed library, as its users would
/// (`pkg-config --cflags --libs portmux`), warnings as errors.
fn compile(source: &Path, name: &str, statically: bool) -> PathBuf {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let out = prefix().join(format!("{name}-{}", SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
    let mut cc = Command::new("cc");
    cc.args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-g", "-o"]).arg(&out).arg(source);
    cc.args(pkg_config(&["--cflags"]));
    if statically {
        // The archive itself, then what Libs.private says it needs.
        cc.arg(prefix().join("lib/libportmux.a"));
        cc.args(pkg_config(&["--static", "--libs"]).into_iter().filter(|a| a != "-lportmux" && !a.starts_with("-L")));
    } else {
        cc.args(pkg_config(&["--libs"]));
        cc.arg(format!("-Wl,-rpath,{}", prefix().join("lib").display()));
    }
    cc.arg("-lpthread");
    let result = cc.output().unwrap();
    assert!(result.status.success(), "cc {}: {}", source.display(), String::from_utf8_lossy(&result.stderr));
    out
}

fn has_valgrind() -> bool {
    Command::new("valgrind").arg("--version").output().is_ok_and(|o| o.status.success())
}

/// `program ARGS` under valgrind (when installed): any invalid access or
/// definite/indirect leak makes it exit 99.
fn under_valgrind(program: &Path) -> Command {
    if !has_valgrind() {
        eprintln!("valgrind is not installed; running {} without it", program.display());
        return Command::new(program);
    }
    let mut cmd = Command::new("valgrind");
    cmd.args([
        "--quiet",
        "--leak-check=full",
        "--show-leak-kinds=definite,indirect",
        "--errors-for-leak-kinds=definite,indirect",
        "--error-exitcode=99",
    ]);
    cmd.arg(program);
    cmd
}

fn c_hello() -> PathBuf {
    compile(&ffi_dir().join("examples/hello.c"), "hello", false)
}

fn start_c(program: &Path, pm: &Portmux, spec: &str, body: &str, valgrind: bool) -> Service {
    let mut cmd = if valgrind { under_valgrind(program) } else { Command::new(program) };
    cmd.arg(spec).arg(body);
    Service::spawn(cmd, pm.control(), "registered").unwrap_or_else(|e| panic!("hello.c {spec}: {e}"))
}

#[test]
fn the_c_example_serves_the_walkthrough() {
    let hello = c_hello();
    let pm = Portmux::start(&[]);
    let port = free_port();
    // By path, next to a Rust service on the same port.
    let mut a = start_c(&hello, &pm, &format!("http://:{port}/a?name=c-a"), "From A", false);
    let _b = Service::hello(&pm, &format!("http://:{port}/b"), "From B", &[]);
    assert_eq!(curl(&[&format!("http://127.0.0.1:{port}/a/")]), "From A");
    assert_eq!(curl(&[&format!("http://127.0.0.1:{port}/b/")]), "From B");
    // Keep-alive: several requests (one with a body) on one handed-over connection.
    let mut conn = Http::connect(port);
    for i in 0..3 {
        assert_eq!(conn.get("x", &format!("/a/{i}")).unwrap().body, "From A");
    }
    use std::io::Write;
    write!(conn.stream, "POST /a/post HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello").unwrap();
    assert_eq!(read_response(&mut conn.stream).unwrap().body, "From A");
    assert_eq!(conn.get("x", "/a/after-body").unwrap().body, "From A");

    // By Host.
    let host_port = free_port();
    let _api = start_c(&hello, &pm, &format!("http://api.example.test:{host_port}?name=c-api"), "API", false);
    let _www = start_c(&hello, &pm, &format!("http://www.example.test:{host_port}?name=c-www"), "WWW", false);
    assert_eq!(get(host_port, "api.example.test", "/").unwrap().body, "API");
    assert_eq!(get(host_port, "www.example.test", "/").unwrap().body, "WWW");

    // A restart within the linger period: requests that arrive meanwhile wait
    // and are answered by the new instance.
    assert!(a.terminate().is_some_and(|s| s.success()), "hello.c stops cleanly on SIGTERM: {}", a.stderr());
    let route = format!("http://:{port}/a");
    pm.wait_reserved(&route);
    let waiting: Vec<_> =
        (0..3).map(|i| thread::spawn(move || get(port, "x", &format!("/a/w{i}")).map_err(|e| e.to_string()))).collect();
    pm.wait_queued(&route, 3);
    let _a2 = start_c(&hello, &pm, &format!("http://:{port}/a?name=c-a"), "From A again", false);
    for w in waiting {
        let r = w.join().unwrap().expect("a queued request failed");
        assert_eq!((r.status, r.body.as_str()), (200, "From A again"));
    }
}

#[test]
fn the_c_example_accepts_from_a_lent_port_and_its_restart_loses_nothing() {
    use crate::lend::{handed_off, lent};
    let hello = c_hello();
    let pm = Portmux::start(&[]);
    let port = free_port();
    let route = format!("http://:{port}?lend");
    let mut first = start_c(&hello, &pm, &format!("{route}&name=c-lend"), "lent to C", false);
    pm.wait_for("the port lent", |pm| lent(pm, &route));
    for i in 0..5 {
        assert_eq!(get(port, "x", &format!("/{i}")).unwrap().body, "lent to C");
    }
    assert_eq!(handed_off(&pm, &route), 0, "libportmux accepted from the socket itself");
    assert!(first.terminate().is_some_and(|s| s.success()), "hello.c stops cleanly: {}", first.stderr());
    pm.wait_reserved(&route);
    let waiting = thread::spawn(move || get(port, "x", "/waited").map_err(|e| e.to_string()));
    pm.wait_queued(&route, 1);
    let _second = start_c(&hello, &pm, &format!("{route}&name=c-lend"), "lent again", false);
    assert_eq!(waiting.join().unwrap().expect("the queued request").body, "lent again");
    pm.wait_for("the port lent again", |pm| lent(pm, &route));
}

#[test]
fn the_c_example_runs_clean_under_valgrind() {
    let hello = c_hello();
    let pm = Portmux::start(&[]);
    let port = free_port();
    let mut svc = start_c(&hello, &pm, &format!("http://:{port}/v?name=valgrind"), "checked", true);
    let threads = thread_count(svc.pid());
    for i in 0..5 {
        assert_eq!(get(port, "x", &format!("/v/{i}")).unwrap().body, "checked");
    }
    let mut conn = Http::connect(port);
    for _ in 0..5 {
        assert_eq!(conn.get("x", "/v/ka").unwrap().body, "checked");
    }
    drop(conn);
    // The connection threads finish: the service is back to its threads before them.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while thread_count(svc.pid()) > threads {
        assert!(std::time::Instant::now() < deadline, "hello.c's connection threads did not finish");
        thread::sleep(Duration::from_millis(10));
    }
    let status = svc.terminate();
    assert!(
        status.is_some_and(|s| s.success()),
        "{} under valgrind (99: memory errors or leaks):\n{}",
        exit_text(status),
        svc.stderr()
    );
}

#[test]
fn the_c_example_links_statically_and_the_library_has_a_soname() {
    let hello = compile(&ffi_dir().join("examples/hello.c"), "hello-static", true);
    let dynamic = String::from_utf8(Command::new("readelf").arg("-d").arg(&hello).output().unwrap().stdout).unwrap();
    assert!(!dynamic.contains("libportmux"), "linked statically, yet needs libportmux:\n{dynamic}");
    let pm = Portmux::start(&[]);
    let port = free_port();
    let _svc = start_c(&hello, &pm, &format!("http://:{port}?name=static"), "static", false);
    assert_eq!(get(port, "x", "/").unwrap().body, "static");

    let lib = prefix().join("lib/libportmux.so");
    let dynamic = String::from_utf8(Command::new("readelf").arg("-d").arg(&lib).output().unwrap().stdout).unwrap();
    assert!(dynamic.contains("[libportmux.so.0]"), "SONAME libportmux.so.0 expected:\n{dynamic}");
}

fn errors_program() -> PathBuf {
    compile(&ffi_dir().join("tests/errors.c"), "errors", false)
}

#[test]
fn error_paths_give_clear_codes_and_leak_nothing() {
    let errors = errors_program();
    let dir = TempDir::new();
    // NULL arguments, bad specs, strerror, and no portmux running.
    let out = under_valgrind(&errors)
        .arg("offline")
        .env("PORTMUX_CONTROL", dir.path().join("nobody-here.sock"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.ends_with("ok\n"), "{text}\n{}", String::from_utf8_lossy(&out.stderr));

    // A route another service holds.
    let pm = Portmux::start(&[]);
    let port = free_port();
    let _holder = Service::hello(&pm, &format!("http://:{port}/r"), "holder", &["--name", "the-holder"]);
    let out = under_valgrind(&errors)
        .args(["refused", &format!("http://:{port}/r?name=intruder"), "the-holder"])
        .env("PORTMUX_CONTROL", pm.control())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.ends_with("ok\n"), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_connection_arriving_with_the_fd_table_full_is_reported_and_delivered_again() {
    let errors = errors_program();
    let pm = Portmux::start(&[]);
    let port = free_port();
    let mut cmd = Command::new(&errors);
    cmd.args(["fdlimit", &format!("http://:{port}/fd?name=fdlimit")]).stdin(Stdio::null());
    let mut svc = Service::spawn(cmd, pm.control(), "full").unwrap_or_else(|e| panic!("errors fdlimit: {e}"));
    // The program is now out of fds: the connection arrives without its fd
    // (MSG_CTRUNC), is rejected, and comes back once fds are free again.
    let response = get(port, "x", "/fd").unwrap();
    assert_eq!((response.status, response.body.as_str()), (200, "recovered"));
    // It then frees the listener, checks its fd count is back to where it
    // started, and exits by itself.
    let status = svc.wait(Duration::from_secs(10));
    assert!(status.is_some_and(|s| s.success()), "{}: {}", exit_text(status), svc.stderr());
    assert!(pm.log().contains("reject"), "portmux saw the rejection: {}", pm.log());
}

#[test]
fn the_python_struct_mirror_has_the_c_layout() {
    let source = prefix().join("layout.c");
    std::fs::write(
        &source,
        "#include <stddef.h>\n#include <stdio.h>\n#include \"portmux.h\"\nint main(void) {\n    \
         printf(\"%zu %zu %zu %zu\\n\", sizeof(portmux_conn_info), offsetof(portmux_conn_info, peer),\n           \
         offsetof(portmux_conn_info, path), offsetof(portmux_conn_info, route));\n    return 0;\n}\n",
    )
    .unwrap();
    let c = Command::new(compile(&source, "layout", false)).output().unwrap();
    let python = Command::new("python3")
        .arg("-c")
        .arg(
            "import ctypes, sys; sys.path.insert(0, sys.argv[1]); import hello; C = hello.ConnInfo; \
             print(ctypes.sizeof(C), C.peer.offset, C.path.offset, C.route.offset)",
        )
        .arg(ffi_dir().join("examples"))
        .output()
        .unwrap();
    let (c, python) = (String::from_utf8_lossy(&c.stdout), String::from_utf8_lossy(&python.stdout));
    assert!(!c.trim().is_empty(), "the layout probe printed nothing");
    assert_eq!(python, c, "hello.py's ConnInfo must match portmux.h's portmux_conn_info");
}

#[test]
fn the_python_example_serves_through_ctypes_and_survives_a_portmux_restart() {
    prefix();
    let dir = TempDir::new();
    let control = dir.path().join("control.sock");
    let mut pm = Portmux::start_at(&control, &[], None).unwrap();
    let port = free_port();
    let mut cmd = Command::new("python3");
    cmd.arg(ffi_dir().join("examples/hello.py"))
        .arg(format!("http://:{port}/py?name=python"))
        .arg("From Python")
        .env("PORTMUX_LIB", prefix().join("lib/libportmux.so.0"));
    let mut svc = Service::spawn(cmd, &control, "registered").unwrap_or_else(|e| panic!("hello.py: {e}"));
    assert_eq!(curl(&[&format!("http://127.0.0.1:{port}/py/")]), "From Python");
    let mut conn = Http::connect(port);
    assert_eq!(conn.get("x", "/py/1").unwrap().body, "From Python");
    assert_eq!(conn.get("x", "/py/2").unwrap().body, "From Python");

    // portmux goes away and comes back: the event loop's fd wakes it to
    // reconnect and register again; the connection it holds carries on.
    pm.kill();
    assert_eq!(conn.get("x", "/py/3").unwrap().body, "From Python");
    thread::sleep(Duration::from_millis(300)); // a few failed reconnection attempts
    let pm2 = Portmux::start_at(&control, &[], None).unwrap();
    pm2.wait_instances(&format!("http://:{port}/py"), 1);
    assert_eq!(get(port, "x", "/py/after").unwrap().body, "From Python");
    let status = svc.terminate();
    assert!(status.is_some_and(|s| s.success()), "{}: {}", exit_text(status), svc.stderr());
}

#[test]
fn the_c_example_restarted_under_load_loses_no_request() {
    let hello = c_hello();
    let pm = Portmux::start(&[]);
    let port = free_port();
    let spec = format!("http://:{port}?name=c-web");
    let start = || start_c(&hello, &pm, &spec, "From C", false);
    crate::graceful::restarts_under_load(&pm, &start, port, 5);
}

#[test]
fn the_python_example_restarted_under_load_loses_no_request() {
    prefix();
    let pm = Portmux::start(&[]);
    let port = free_port();
    let spec = format!("http://:{port}?name=py-web");
    let start = || {
        let mut cmd = Command::new("python3");
        cmd.arg(ffi_dir().join("examples/hello.py"))
            .arg(&spec)
            .arg("From Python")
            .env("PORTMUX_LIB", prefix().join("lib/libportmux.so.0"));
        Service::spawn(cmd, pm.control(), "registered").unwrap_or_else(|e| panic!("hello.py: {e}"))
    };
    crate::graceful::restarts_under_load(&pm, &start, port, 5);
}

#[test]
fn a_c_service_behind_tls_termination_sees_the_handshake_and_the_client_certificate() {
    let dir = TempDir::new();
    let pki = Pki::new(dir.path());
    let pm = Portmux::start(&["--cert-dir", &dir.path().to_string_lossy()]);
    let port = free_port();
    let (cert, key) = pki.leaf("c.example.test");
    let (client_cert, client_key) = pki.leaf("client.example.test");
    let ca = pki.ca_pem.to_string_lossy().into_owned();
    // A C service claims an https:// route and sends the certificate itself.
    let spec = format!("https://c.example.test:{port}?name=c-tls&client_ca={ca}");
    let mut cmd = if has_valgrind() { under_valgrind(&c_hello()) } else { Command::new(c_hello()) };
    cmd.args([spec.as_str(), "From C", &cert, &key]);
    let _c = Service::spawn(cmd, pm.control(), "registered").unwrap_or_else(|e| panic!("hello.c {spec}: {e}"));
    let cfg = crate::tls::with_client_cert(&pki, &client_cert, &client_key);
    let (r, ..) = crate::tls::tls_request(cfg, port, Some("c.example.test"), "", "c.example.test", "/").unwrap();
    assert_eq!(r.body, "From C");
    let facts = r.head.lines().find_map(|l| l.strip_prefix("x-portmux-tls: ")).unwrap_or_default();
    assert!(facts.starts_with("version=TLSv1.3; cipher=TLS13_AES_128_GCM_SHA256; sni=c.example.test"), "{facts}");
    assert!(facts.ends_with("alpn=http/1.1; client-certs=1"), "{facts}");
}
