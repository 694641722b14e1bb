//! The socketmaster walkthrough through the real binaries: start with no
//! configuration, services claim routes by path, Host and SNI, pools, conflicts.

use crate::util::*;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

#[test]
fn run_says_where_it_listens_and_takes_the_control_path_from_flag_or_env() {
    let dir = TempDir::new();
    // --control
    let flag_path = dir.path().join("flag.sock");
    let pm = Portmux::start_at(&flag_path, &[], None).unwrap();
    let mode = std::fs::metadata(&flag_path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "control socket mode");
    // A second portmux on the same socket refuses, and says why.
    let second =
        Command::new(env!("CARGO_BIN_EXE_portmux")).args(["run", "--control"]).arg(&flag_path).output().unwrap();
    assert!(!second.status.success());
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("already serving the control socket"), "{err}");
    drop(pm);

    // PORTMUX_CONTROL, with a stale socket left behind by the killed portmux.
    assert!(flag_path.exists(), "a killed portmux leaves its socket behind");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_portmux"));
    cmd.args(["run", "--bind", "127.0.0.1"]).env("PORTMUX_CONTROL", &flag_path);
    let mut pm = Portmux::spawn(cmd, &flag_path, None).unwrap();
    assert!(pm.wait_log("removing stale control socket", Duration::from_secs(5)), "{}", pm.log());
    let port = free_port();
    let _svc = Service::hello(&pm, &format!("http://:{port}/"), "via env", &[]);
    assert_eq!(get(port, "x", "/").unwrap().body, "via env");
    assert_eq!(exit_text(pm.terminate(Duration::from_secs(10))), "exit code 0");
    assert!(!flag_path.exists(), "a stopped portmux removes its control socket");
}

#[test]
fn services_share_a_port_by_path_prefix() {
    let pm = Portmux::start(&[]);
    let port = free_port();
    let _a = Service::hello(&pm, &format!("http://:{port}/a"), "From A", &[]);
    let _b = Service::hello(&pm, &format!("http://:{port}/b"), "From B", &[]);
    // As in socketmaster's README, with curl.
    assert_eq!(curl(&[&format!("localhost:{port}/a/")]), "From A");
    assert_eq!(curl(&[&format!("localhost:{port}/b/")]), "From B");
    assert_eq!(curl(&[&format!("localhost:{port}/a/deeper/path?q=1")]), "From A");
    // Prefixes end at segment boundaries; nothing else matches.
    let r = get(port, "localhost", "/ab").unwrap();
    assert_eq!(r.status, 404, "{r:?}");
    assert!(r.body.contains("no route on port") && r.body.contains("/ab"), "{}", r.body);
    assert_eq!(get(port, "localhost", "/").unwrap().status, 404);
}

#[test]
fn services_share_a_port_by_host() {
    let pm = Portmux::start(&[]);
    let port = free_port();
    let _api = Service::hello(&pm, &format!("http://api.example.test:{port}"), "api", &[]);
    let _www = Service::hello(&pm, &format!("http://www.example.test:{port}"), "www", &[]);
    let _any = Service::hello(&pm, &format!("http://*.other.test:{port}"), "wildcard", &[]);
    let resolve = |h: &str| format!("{h}:{port}:127.0.0.1");
    assert_eq!(curl(&["--resolve", &resolve("api.example.test"), &format!("http://api.example.test:{port}/")]), "api");
    assert_eq!(curl(&["--resolve", &resolve("www.example.test"), &format!("http://WWW.example.test:{port}/x")]), "www");
    assert_eq!(get(port, "deep.sub.other.test", "/").unwrap().body, "wildcard");
    assert_eq!(get(port, "other.test", "/").unwrap().status, 404);
    assert_eq!(get(port, "unknown.example.test", "/").unwrap().status, 404);
}

#[test]
fn services_share_a_port_by_sni_and_tls_stays_end_to_end() {
    let dir = TempDir::new();
    let pki = Pki::new(dir.path());
    let pm = Portmux::start(&[]);
    let port = free_port();
    let (ca, ka) = pki.leaf("a.example.test");
    let (cb, kb) = pki.leaf("b.example.test");
    let _a =
        Service::hello(&pm, &format!("tls://a.example.test:{port}"), "From A", &["--tls-cert", &ca, "--tls-key", &ka]);
    let _b =
        Service::hello(&pm, &format!("tls://b.example.test:{port}"), "From B", &["--tls-cert", &cb, "--tls-key", &kb]);
    // The certificate verifies for the name asked: the service, not portmux, terminated TLS.
    let cfg = pki.client_config();
    assert_eq!(tls_get(cfg.clone(), port, "a.example.test", "/", None).unwrap().body, "From A");
    assert_eq!(tls_get(cfg.clone(), port, "b.example.test", "/", None).unwrap().body, "From B");
    let ca_pem = pki.ca_pem.to_string_lossy().into_owned();
    let url = format!("https://b.example.test:{port}/");
    let resolve = format!("b.example.test:{port}:127.0.0.1");
    assert_eq!(curl(&["--cacert", &ca_pem, "--resolve", &resolve, &url]), "From B");
    // An unknown name gets a TLS unrecognized_name alert.
    let err = tls_get(cfg, port, "c.example.test", "/", None).unwrap_err();
    assert!(err.to_lowercase().contains("unrecognizedname") || err.contains("UnrecognisedName"), "{err}");
}

#[test]
fn one_name_forms_a_round_robin_pool_and_another_owner_is_refused() {
    let pm = Portmux::start(&[]);
    let port = free_port();
    let spec = format!("http://:{port}/api");
    let _one = Service::hello(&pm, &spec, "one", &["--name", "pool"]);
    let _two = Service::hello(&pm, &spec, "two", &["--name", "pool"]);
    let mut seen = std::collections::HashMap::new();
    for _ in 0..20 {
        *seen.entry(get(port, "x", "/api").unwrap().body).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "both instances serve: {seen:?}");
    assert!(seen.values().all(|&n| n >= 5), "round robin spreads connections: {seen:?}");

    let refused = Service::try_hello(pm.control(), &spec, "intruder", &["--name", "other"]).err().unwrap();
    assert!(refused.contains("held by service 'pool'"), "{refused}");
    assert!(refused.contains("pid "), "the refusal names the holder's pid: {refused}");
    assert!(refused.starts_with("exit code 1\n"), "the refused service exits with an error: {refused}");
}

#[test]
fn a_raw_tcp_route_alone_on_its_port_is_not_peeked() {
    let pm = Portmux::start(&[]);
    let port = free_port();
    let listener = portmux_client::Builder::new()
        .route(format!("tcp://127.0.0.1:{port}"))
        .name("smtp")
        .control(pm.control())
        .bind()
        .unwrap();
    let server = std::thread::spawn(move || {
        let (mut stream, info) = listener.accept().unwrap();
        // Server speaks first, as SMTP does.
        stream.write_all(b"220 ready\r\n").unwrap();
        let mut line = [0u8; 6];
        stream.read_exact(&mut line).unwrap();
        (info, line)
    });
    let mut c = client(port);
    let mut banner = [0u8; 11];
    c.read_exact(&mut banner).unwrap();
    assert_eq!(&banner, b"220 ready\r\n");
    c.write_all(b"QUIT\r\n").unwrap();
    let (info, line) = server.join().unwrap();
    assert_eq!(&line, b"QUIT\r\n");
    assert_eq!(info.peeked, 0);
    assert_eq!(info.proto, portmux_client::Proto::Tcp);
    assert_eq!(info.route, format!("tcp://127.0.0.1:{port}"));
    assert_eq!(info.peer, c.local_addr().unwrap(), "the service sees the real client address");
}

#[test]
fn handed_over_connections_carry_what_portmux_learned() {
    let pm = Portmux::start(&[]);
    let port = free_port();
    let listener = portmux_client::Builder::new()
        .route(format!("http://Meta.Test:{port}/m"))
        .control(pm.control())
        .bind()
        .unwrap();
    let mut c = client(port);
    let request = "GET /m/x?y=1 HTTP/1.1\r\nHost: meta.test:1234\r\n\r\n";
    c.write_all(request.as_bytes()).unwrap();
    let (mut stream, info) = listener.accept().unwrap();
    assert_eq!(info.host.as_deref(), Some("meta.test"));
    assert_eq!(info.path.as_deref(), Some("/m/x?y=1"));
    assert_eq!(info.route, format!("http://meta.test:{port}/m"));
    assert_eq!(info.proto, portmux_client::Proto::Http);
    assert_eq!(info.peeked as usize, request.len());
    assert_eq!(info.local.port(), port);
    // The peeked bytes are all still there for the service to read.
    let mut got = vec![0u8; request.len()];
    stream.read_exact(&mut got).unwrap();
    assert_eq!(got, request.as_bytes());
}

#[test]
fn axum_serves_on_a_portmux_listener() {
    let pm = Portmux::start(&[]);
    let port = free_port();
    let control = pm.control().to_path_buf();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let listener = rt
        .block_on(portmux_client::Builder::new().route(format!("http://:{port}/api")).control(control).bind_async())
        .unwrap();
    rt.spawn(async move {
        use axum::extract::ConnectInfo;
        let app = axum::Router::new().fallback(
            |ConnectInfo(info): ConnectInfo<portmux_client::ConnInfo>, uri: axum::http::Uri| async move {
                format!("{uri} via {} from {}", info.route, info.peer.ip())
            },
        );
        axum::serve(listener, app.into_make_service_with_connect_info::<portmux_client::ConnInfo>()).await
    });
    let r = get(port, "x", "/api/users").unwrap();
    assert_eq!(r.body, format!("/api/users via http://:{port}/api from 127.0.0.1"));
}

#[test]
fn a_route_can_name_its_listening_address_including_ipv6() {
    let pm = Portmux::start(&[]);
    let port = free_port();
    let listener = portmux_client::Builder::new()
        .route(format!("http://[::1]:{port}/six?bind=::1"))
        .control(pm.control())
        .bind()
        .unwrap();
    assert_eq!(listener.local_addr().unwrap(), format!("[::1]:{port}").parse().unwrap());
    let mut c = std::net::TcpStream::connect(("::1", port)).unwrap();
    write!(c, "GET /six HTTP/1.1\r\nHost: [::1]:{port}\r\n\r\n").unwrap();
    let (_stream, info) = listener.accept().unwrap();
    assert_eq!(info.host.as_deref(), Some("[::1]"));
    assert!(info.peer.is_ipv6() && info.peer.ip().is_loopback(), "{}", info.peer);
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err(), "only ::1 listens");
}
