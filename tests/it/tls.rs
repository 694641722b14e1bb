//! TLS termination: `https://` routes served with certificates from files or
//! from the registering service, chosen by SNI, next to `tls://`
//! passthrough on one port; the 421 rule, redirects to https, client
//! certificates, certificate reloads, and resumption across an upgrade.

use crate::util::*;
use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// One request over a new TLS connection: SNI `sni` (none when `None`: the
/// server must then present a certificate for `verify_as`), Host `host`.
/// The response, and the TLS version and the served certificate.
pub fn tls_request(
    cfg: Arc<rustls::ClientConfig>,
    port: u16,
    sni: Option<&str>,
    verify_as: &str,
    host: &str,
    path: &str,
) -> Result<(Response, String, Vec<u8>), String> {
    let mut cfg = (*cfg).clone();
    cfg.enable_sni = sni.is_some();
    // A full handshake every time: the certificate served now is the one seen.
    cfg.resumption = rustls::client::Resumption::disabled();
    let name = rustls::pki_types::ServerName::try_from(sni.unwrap_or(verify_as).to_string()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let mut sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    write!(tls, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").map_err(|e| e.to_string())?;
    let response = read_response(&mut tls).map_err(|e| e.to_string())?;
    let version = format!("{:?}", conn.protocol_version().unwrap());
    let cert = conn.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec()).unwrap_or_default();
    Ok((response, version, cert))
}

/// The `x-portmux-tls` header `hello` answers with on a terminated connection.
fn facts(r: &Response) -> String {
    r.head.lines().find_map(|l| l.strip_prefix("x-portmux-tls: ")).unwrap_or("").to_string()
}

fn add_route(pm: &Portmux, spec: &str, backend: Option<&str>) -> Result<String, String> {
    let mut args = vec!["route", "add", spec];
    if let Some(b) = backend {
        args.extend(["--backend", b]);
    }
    let (ok, out, err) = portmux_cli(pm, &args);
    if ok { Ok(out) } else { Err(err) }
}

#[test]
fn terminates_tls_by_sni_to_backends_and_services_beside_passthrough() {
    let dir = TempDir::new();
    let pki = Pki::new(dir.path());
    let pm = Portmux::start(&["--cert-dir", &dir.path().to_string_lossy()]);
    let port = free_port();
    let (a_cert, a_key) = pki.leaf("a.example.test");
    let (w_cert, w_key) = pki.leaf("*.wild.example.test");
    let (d_cert, d_key) = pki.leaf("default.example.test");
    let (s_cert, s_key) = pki.leaf("svc.example.test");
    let (p_cert, p_key) = pki.leaf("pass.example.test");
    let (_a, a) = Service::backend("A backend", &[]);
    let (_w, w) = Service::backend("wildcard backend", &[]);
    let (_d, d) = Service::backend("default backend", &[]);
    let (_p, p) = Service::backend("passthrough backend", &["--tls-cert", &p_cert, "--tls-key", &p_key]);
    add_route(&pm, &format!("https://a.example.test:{port}?cert={a_cert}&key={a_key}"), Some(&a.to_string())).unwrap();
    add_route(&pm, &format!("https://*.wild.example.test:{port}?cert={w_cert}&key={w_key}"), Some(&w.to_string()))
        .unwrap();
    add_route(&pm, &format!("https://:{port}?cert={d_cert}&key={d_key}"), Some(&d.to_string())).unwrap();
    add_route(&pm, &format!("tls://pass.example.test:{port}"), Some(&p.to_string())).unwrap();
    let svc_spec = format!("https://svc.example.test:{port}");
    let _svc = Service::hello(&pm, &svc_spec, "from the service", &["--tls-cert", &s_cert, "--tls-key", &s_key]);

    let cfg = pki.client_config();
    let get =
        |sni: Option<&str>, verify_as: &str, host: &str| tls_request(cfg.clone(), port, sni, verify_as, host, "/x");
    let (r, version, _) = get(Some("a.example.test"), "", "a.example.test").unwrap();
    assert_eq!((r.status, r.body.as_str(), version.as_str()), (200, "A backend", "TLSv1_3"));
    let (r, ..) = get(Some("x.wild.example.test"), "", "x.wild.example.test").unwrap();
    assert_eq!(r.body, "wildcard backend", "the wildcard certificate verified for a name under it");
    let e = get(Some("other.example.test"), "", "other.example.test").unwrap_err();
    assert!(e.contains("not valid for name"), "the catch-all's certificate is served, which does not name it: {e}");
    let (r, ..) = get(None, "default.example.test", "default.example.test").unwrap();
    assert_eq!(r.body, "default backend", "no SNI: the default certificate, routed by Host");
    let (r, ..) = get(Some("pass.example.test"), "", "pass.example.test").unwrap();
    assert_eq!(r.body, "passthrough backend", "tls:// on the same port passes TLS through");

    let (r, ..) = get(Some("svc.example.test"), "", "svc.example.test").unwrap();
    assert_eq!(r.body, "from the service");
    let f = facts(&r);
    assert!(f.contains("version=TLSv1.3") && f.contains("sni=svc.example.test"), "{f}");
    assert!(f.contains("alpn=http/1.1") && f.contains("cipher=TLS13_") && f.contains("client-certs=0"), "{f}");
    let (r, version, _) = tls_request(
        client_config(&[pki.ca_der()], &[&rustls::version::TLS12], None),
        port,
        Some("svc.example.test"),
        "",
        "svc.example.test",
        "/",
    )
    .unwrap();
    assert_eq!(version, "TLSv1_2");
    assert!(facts(&r).contains("version=TLSv1.2; cipher=TLS_ECDHE_"), "{}", facts(&r));

    let (r, ..) = get(Some("a.example.test"), "", "svc.example.test").unwrap();
    assert_eq!(r.status, 421, "a Host other than the SNI is misdirected: {}", r.body);
    assert!(r.body.contains("svc.example.test") && r.body.contains("a.example.test"), "{}", r.body);
}

#[test]
fn http_redirects_to_https_and_plain_http_on_a_tls_port_is_told() {
    let dir = TempDir::new();
    let pki = Pki::new(dir.path());
    let pm = Portmux::start(&["--cert-dir", &dir.path().to_string_lossy()]);
    let (http, https) = (free_port(), free_port());
    let (cert, key) = pki.leaf("r.example.test");
    let (_b, b) = Service::backend("secure", &[]);
    add_route(&pm, &format!("https://r.example.test:{https}?cert={cert}&key={key}"), Some(&b.to_string())).unwrap();
    add_route(&pm, &format!("http://r.example.test:{http}?redirect=https"), None).unwrap();
    let r = get(http, "r.example.test", "/a/b?c=d").unwrap();
    assert_eq!(r.status, 308, "{}", r.head);
    assert!(r.head.contains("Location: https://r.example.test/a/b?c=d\r\n"), "{}", r.head);
    let err = add_route(&pm, &format!("http://x.example.test:{http}"), None).unwrap_err();
    assert!(err.contains("--backend"), "{err}");
    // An https:// route may redirect elsewhere too (SRP's redirect hosts on 443).
    let (cert, key) = pki.leaf("old.example.test");
    let target = "https%3A%2F%2Fnew.example.test%2Fbase";
    add_route(
        &pm,
        &format!("https://old.example.test:{https}?cert={cert}&key={key}&redirect={target}&redirect_code=301"),
        None,
    )
    .unwrap();
    let r = tls_get(pki.client_config(), https, "old.example.test", "/a?b=c", None).unwrap();
    assert_eq!(r.status, 301, "{}", r.head);
    assert!(r.head.to_ascii_lowercase().contains("location: https://new.example.test/base/a?b=c\r\n"), "{}", r.head);

    let plain = raw_exchange(https, b"GET / HTTP/1.1\r\nHost: r.example.test\r\n\r\n");
    let plain = String::from_utf8_lossy(&plain);
    assert!(plain.starts_with("HTTP/1.1 400") && plain.contains("expects TLS"), "{plain}");
}

#[test]
fn certificate_problems_are_refused_with_the_file_and_the_reason() {
    let dir = TempDir::new();
    let outside = TempDir::new();
    let pki = Pki::new(dir.path());
    let pm = Portmux::start(&["--cert-dir", &dir.path().to_string_lossy()]);
    let port = free_port();
    let (cert, key) = pki.leaf("c.example.test");
    let (other_cert, _) = pki.leaf("other.example.test");
    let missing = dir.path().join("missing.pem");
    let err = add_route(
        &pm,
        &format!("https://c.example.test:{port}?cert={}&key={key}", missing.display()),
        Some("127.0.0.1:1"),
    )
    .unwrap_err();
    assert!(err.contains(&missing.display().to_string()) && err.contains("No such file"), "{err}");
    let err =
        add_route(&pm, &format!("https://c.example.test:{port}?cert={other_cert}&key={key}"), Some("127.0.0.1:1"))
            .unwrap_err();
    assert!(err.contains("not the key of the certificate"), "{err}");
    let err = add_route(&pm, &format!("https://c.example.test:{port}?cert={key}&key={key}"), Some("127.0.0.1:1"))
        .unwrap_err();
    assert!(err.contains("no CERTIFICATE block"), "{err}");
    let err = add_route(&pm, &format!("https://c.example.test:{port}"), Some("127.0.0.1:1")).unwrap_err();
    assert!(err.contains("cert=CHAIN.pem&key=KEY.pem"), "{err}");
    if pm.status().sandbox.is_some() {
        let stray = outside.path().join("c.pem");
        std::fs::copy(&cert, &stray).unwrap();
        let err = add_route(
            &pm,
            &format!("https://c.example.test:{port}?cert={}&key={key}", stray.display()),
            Some("127.0.0.1:1"),
        )
        .unwrap_err();
        assert!(err.contains("--cert-dir") && err.contains("ermission denied"), "{err}");
    }
    // A service sending a broken certificate is refused the same way.
    let err = Service::try_hello(
        pm.control(),
        &format!("https://c.example.test:{port}"),
        "x",
        &["--tls-cert", &key, "--tls-key", &key],
    )
    .err()
    .unwrap_or_default();
    assert!(err.contains("the certificate sent is unusable"), "{err}");
    assert!(!pm.listens_on(port), "nothing was claimed");

    // One host, one client-certificate rule, on a port.
    let ca = pki.ca_pem.display().to_string();
    add_route(
        &pm,
        &format!("https://c.example.test:{port}/a?cert={cert}&key={key}&client_ca={ca}"),
        Some("127.0.0.1:1"),
    )
    .unwrap();
    let err = add_route(&pm, &format!("https://c.example.test:{port}/b?cert={cert}&key={key}"), Some("127.0.0.1:1"))
        .unwrap_err();
    assert!(err.contains("asks for the same client") && err.contains("client_ca="), "{err}");
    let s = RawSession::connect(pm.control());
    s.send(&portmux_wire::Message::Hello { version: portmux_wire::PROTOCOL_VERSION, service: "two".into() });
    let routes = [
        format!("https://t.example.test:{port}/a?cert={cert}&key={key}&client_ca={ca}"),
        format!("https://t.example.test:{port}/b?cert={cert}&key={key}"),
    ];
    s.send(&portmux_wire::Message::Register { routes: routes.to_vec() });
    match s.recv() {
        Some((portmux_wire::Message::Refused { reason, .. }, _)) => {
            assert!(reason.contains("in the same registration asks for another client certificate"), "{reason}")
        }
        other => panic!("expected Refused, got {other:?}"),
    }
    // An instance joining a route claims it with the route's TLS options.
    let joined = format!("https://j.example.test:{port}");
    let (j_cert, j_key) = pki.leaf("j.example.test");
    let _first = Service::hello(&pm, &format!("{joined}?cert={j_cert}&key={j_key}"), "1", &["--name", "j"]);
    let err =
        Service::try_hello(pm.control(), &joined, "2", &["--name", "j", "--tls-cert", &j_cert, "--tls-key", &j_key])
            .err()
            .unwrap_or_default();
    assert!(err.contains("claims it with the same cert=, key=, client_ca= and acme"), "{err}");
}

/// A client configuration that presents `cert`/`key` (PEM files) when asked.
pub fn with_client_cert(pki: &Pki, cert: &str, key: &str) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(cert).unwrap().collect::<Result<_, _>>().unwrap();
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    client_config(&[pki.ca_der()], rustls::DEFAULT_VERSIONS, Some((chain, key)))
}

#[test]
fn client_certificates_are_required_and_verified_and_the_service_sees_the_chain() {
    let dir = TempDir::new();
    let pki = Pki::new(dir.path());
    let other_dir = TempDir::new();
    let stranger = Pki::new(other_dir.path());
    let pm = Portmux::start(&["--cert-dir", &dir.path().to_string_lossy()]);
    let port = free_port();
    let (cert, key) = pki.leaf("m.example.test");
    let (client_cert, client_key) = pki.leaf("client.example.test");
    let (bad_cert, bad_key) = stranger.leaf("client.example.test");
    let spec = format!("https://m.example.test:{port}?client_ca={}", pki.ca_pem.display());
    let _svc = Service::hello(&pm, &spec, "mutual", &["--tls-cert", &cert, "--tls-key", &key]);

    let ok = with_client_cert(&pki, &client_cert, &client_key);
    let (r, ..) = tls_request(ok, port, Some("m.example.test"), "", "m.example.test", "/").unwrap();
    assert_eq!(r.body, "mutual");
    assert!(facts(&r).contains("client-certs=1"), "the service sees the client's chain: {}", facts(&r));

    let none = tls_request(pki.client_config(), port, Some("m.example.test"), "", "m.example.test", "/");
    assert!(none.is_err(), "no client certificate: refused (an alert, then the close)");
    let wrong = with_client_cert(&pki, &bad_cert, &bad_key);
    let wrong = tls_request(wrong, port, Some("m.example.test"), "", "m.example.test", "/").unwrap_err();
    assert!(!wrong.is_empty(), "a certificate from another CA is refused");
    let (r, ..) = tls_request(
        with_client_cert(&pki, &client_cert, &client_key),
        port,
        Some("m.example.test"),
        "",
        "m.example.test",
        "/",
    )
    .unwrap();
    assert_eq!(r.status, 200, "other clients are served all along");
}

#[test]
fn hostile_and_stalled_handshakes_get_an_alert_or_a_close_within_the_deadline() {
    let dir = TempDir::new();
    let pki = Pki::new(dir.path());
    let pm = Portmux::start(&["--cert-dir", &dir.path().to_string_lossy(), "--peek-timeout", "2s"]);
    let port = free_port();
    let (cert, key) = pki.leaf("h.example.test");
    let (_b, b) = Service::backend("fine", &[]);
    add_route(&pm, &format!("https://h.example.test:{port}?cert={cert}&key={key}"), Some(&b.to_string())).unwrap();
    let hello_for = |sni: &str| {
        let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(pki.client_config(), name).unwrap();
        let mut bytes = Vec::new();
        conn.write_tls(&mut bytes).unwrap();
        bytes
    };
    let unknown = raw_exchange(port, &hello_for("nobody.example.test"));
    assert_eq!(unknown, [21, 3, 3, 0, 2, 2, 112], "an SNI no route knows: unrecognized_name");

    // A ClientHello cut into records of 7 bytes, sent a byte at a time (about
    // 0.8 s of sending, within the 2 s deadline even on a loaded machine).
    let r = tls_get(pki.client_config(), port, "h.example.test", "/", Some((7, 1))).unwrap();
    assert_eq!(r.body, "fine");

    // An SSLv3 client gets protocol_version.
    let answer = raw_exchange(port, &sslv3_hello("h.example.test"));
    assert_eq!(answer, [21, 3, 3, 0, 2, 2, 70], "SSLv3 gets protocol_version");
    let sslv2 = [0x80, 0x2e, 0x01, 0x00, 0x02, 0x00, 0x15, 0x00, 0x00, 0x00, 0x10];
    let answer = raw_exchange(port, &sslv2);
    assert!(answer.is_empty() || answer[0] == 21, "SSLv2 gets an alert or a close: {answer:?}");

    // A client that stops after its ClientHello is closed at the deadline.
    let started = std::time::Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&hello_for("h.example.test")).unwrap();
    let mut sink = Vec::new();
    let _ = std::io::Read::read_to_end(&mut s, &mut sink);
    assert!(started.elapsed() < Duration::from_secs(5), "closed after {:?}", started.elapsed());
    assert!(sink.first() == Some(&22), "the server's flight was sent before the close");
    // And one that never sends a request after the handshake.
    let name = rustls::pki_types::ServerName::try_from("h.example.test").unwrap();
    let mut conn = rustls::ClientConnection::new(pki.client_config(), name).unwrap();
    let mut sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let started = std::time::Instant::now();
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).unwrap();
    }
    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    let mut buf = [0u8; 64];
    let n = std::io::Read::read(&mut tls, &mut buf).unwrap_or(0);
    assert_eq!(n, 0, "a silent client is closed");
    assert!(started.elapsed() < Duration::from_secs(5), "closed after {:?}", started.elapsed());
    assert_eq!(tls_get(pki.client_config(), port, "h.example.test", "/", None).unwrap().body, "fine");
}

/// A ClientHello as an SSLv3 client sends it: version 3.0 in the record and
/// the hello, one cipher suite, the server name, no supported_versions.
fn sslv3_hello(sni: &str) -> Vec<u8> {
    let mut name = vec![0];
    name.extend_from_slice(&(sni.len() as u16).to_be_bytes());
    name.extend_from_slice(sni.as_bytes());
    let mut ext = vec![0, 0];
    ext.extend_from_slice(&(name.len() as u16 + 2).to_be_bytes());
    ext.extend_from_slice(&(name.len() as u16).to_be_bytes());
    ext.extend_from_slice(&name);
    let mut body = vec![3, 0];
    body.extend_from_slice(&[7; 32]);
    body.extend_from_slice(&[0, 0, 2, 0x00, 0x2f, 1, 0]);
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);
    let mut out = vec![22, 3, 0];
    out.extend_from_slice(&(body.len() as u16 + 4).to_be_bytes());
    out.push(1);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&body);
    out
}

#[test]
fn certificate_files_reload_under_load_without_a_failed_request() {
    let dir = TempDir::new();
    let pki = Pki::new(dir.path());
    let pm = Portmux::start(&["--cert-dir", &dir.path().to_string_lossy()]);
    let port = free_port();
    let (cert, key) = pki.leaf("reload.example.test");
    let (live_cert, live_key) = (dir.path().join("live.crt"), dir.path().join("live.key"));
    std::fs::copy(&cert, &live_cert).unwrap();
    std::fs::copy(&key, &live_key).unwrap();
    let (_b, b) = Service::backend("reloaded", &[]);
    let spec = format!("https://reload.example.test:{port}?cert={}&key={}", live_cert.display(), live_key.display());
    add_route(&pm, &spec, Some(&b.to_string())).unwrap();
    let cfg = pki.client_config();
    let served =
        || tls_request(cfg.clone(), port, Some("reload.example.test"), "", "reload.example.test", "/").unwrap().2;
    let first = served();

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let (cfg, stop) = (cfg.clone(), stop.clone());
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0, Vec::new());
                let until = std::time::Instant::now() + Duration::from_secs(30);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && std::time::Instant::now() < until {
                    match tls_request(cfg.clone(), port, Some("reload.example.test"), "", "reload.example.test", "/") {
                        Ok((r, ..)) if r.body == "reloaded" => ok += 1,
                        other => failed.push(format!("{:?}", other.map(|(r, ..)| r.status))),
                    }
                }
                (ok, failed)
            })
        })
        .collect();

    // A broken file is refused; the certificate in use stays.
    std::fs::write(&live_cert, "not a certificate").unwrap();
    pm.wait_for("the broken certificate to be refused", |pm| pm.log().contains("refused, the previous one stays"));
    assert_eq!(served(), first, "the previous certificate is still served");

    // A renewed certificate (a new key too), moved into place as certbot does.
    let (new_cert, new_key) = pki.leaf("reload.example.test");
    let (tmp_cert, tmp_key) = (dir.path().join("tmp.crt"), dir.path().join("tmp.key"));
    std::fs::copy(&new_key, &tmp_key).unwrap();
    std::fs::rename(&tmp_key, &live_key).unwrap();
    std::fs::copy(&new_cert, &tmp_cert).unwrap();
    std::fs::rename(&tmp_cert, &live_cert).unwrap();
    use rustls::pki_types::pem::PemObject;
    let renewed = rustls::pki_types::CertificateDer::from_pem_file(&new_cert).unwrap();
    pm.wait_for("the renewed certificate to be served", |_| served() != first);
    assert_eq!(served(), renewed.to_vec(), "the renewed certificate is the one served");

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in clients {
        let (ok, failed) = c.join().unwrap();
        assert!(ok > 0, "the clients made requests");
        assert!(failed.is_empty(), "no request failed during the reloads: {failed:?}");
    }
}

#[test]
fn sessions_resume_across_an_upgrade_and_service_certificates_move() {
    let dir = TempDir::new();
    let pki = Pki::new(dir.path());
    let mut pm = Portmux::start(&["--cert-dir", &dir.path().to_string_lossy()]);
    let port = free_port();
    let (cert, key) = pki.leaf("resume.example.test");
    let (s_cert, s_key) = pki.leaf("svc.example.test");
    let (_b, b) = Service::backend("resumed", &[]);
    add_route(&pm, &format!("https://resume.example.test:{port}?cert={cert}&key={key}"), Some(&b.to_string())).unwrap();
    let svc_spec = format!("https://svc.example.test:{port}");
    let _svc = Service::hello(&pm, &svc_spec, "service", &["--tls-cert", &s_cert, "--tls-key", &s_key]);
    let session = dir.path().join("session.pem");
    let request = "GET / HTTP/1.1\r\nHost: resume.example.test\r\nConnection: close\r\n\r\n";
    let s_client = |extra: &[&str]| s_client(port, "resume.example.test", &pki.ca_pem, extra, request);
    for version in ["-tls1_3", "-tls1_2"] {
        let first = s_client(&[version, "-sess_out", &session.to_string_lossy()]);
        assert!(first.contains("New, TLSv1.") && first.contains("resumed"), "{first}");
        let again = s_client(&[version, "-sess_in", &session.to_string_lossy()]);
        assert!(again.contains("Reused, TLSv1."), "resumed before the upgrade ({version}): {again}");
        let old = pm.pid();
        let new = pm.upgrade(&[]).unwrap();
        assert_ne!(old, new);
        let after = s_client(&[version, "-sess_in", &session.to_string_lossy()]);
        assert!(
            after.contains("Reused, TLSv1.") && after.contains("resumed"),
            "resumed after the upgrade ({version}): {after}"
        );
    }
    let cfg = pki.client_config();
    let (r, ..) = tls_request(cfg, port, Some("svc.example.test"), "", "svc.example.test", "/").unwrap();
    assert_eq!(r.body, "service", "the certificate the service sent moved with the upgrade");
}

/// `openssl s_client` to `port` with `sni`, sending `request`: its output.
fn s_client(port: u16, sni: &str, ca: &Path, extra: &[&str], request: &str) -> String {
    let mut cmd = std::process::Command::new("openssl");
    cmd.args(["s_client", "-connect", &format!("127.0.0.1:{port}"), "-servername", sni]);
    cmd.args(["-CAfile", &ca.to_string_lossy(), "-verify_return_error", "-ign_eof"]).args(extra);
    cmd.stdin(std::process::Stdio::piped()).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("openssl is installed");
    child.stdin.take().unwrap().write_all(request.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn an_ocsp_response_beside_the_certificate_is_stapled() {
    let dir = TempDir::new();
    let pki = Pki::new(dir.path());
    let pm = Portmux::start(&["--cert-dir", &dir.path().to_string_lossy()]);
    let port = free_port();
    let (cert, key) = pki.leaf("o.example.test");
    let (plain_cert, plain_key) = pki.leaf("p.example.test");
    // A real OCSP response for the certificate, signed by its CA (openssl's responder, one shot).
    let d = dir.path();
    std::fs::write(d.join("index.txt"), "").unwrap();
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl").args(args).current_dir(d).output().unwrap();
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    openssl(&["ocsp", "-issuer", "ca.pem", "-cert", &cert, "-reqout", "req.der", "-no_nonce"]);
    let staple = format!("{cert}.ocsp");
    openssl(&[
        "ocsp",
        "-index",
        "index.txt",
        "-rsigner",
        "ca.pem",
        "-rkey",
        "ca.key",
        "-CA",
        "ca.pem",
        "-reqin",
        "req.der",
        "-respout",
        &staple,
        "-ndays",
        "1",
    ]);
    let (_b, b) = Service::backend("stapled", &[]);
    add_route(&pm, &format!("https://o.example.test:{port}?cert={cert}&key={key}"), Some(&b.to_string())).unwrap();
    add_route(&pm, &format!("https://p.example.test:{port}?cert={plain_cert}&key={plain_key}"), Some(&b.to_string()))
        .unwrap();
    let request = "GET / HTTP/1.1\r\nHost: o.example.test\r\nConnection: close\r\n\r\n";
    let out = s_client(port, "o.example.test", &pki.ca_pem, &["-status"], request);
    assert!(out.contains("OCSP Response Status: successful"), "the staple is sent: {out}");
    let request = "GET / HTTP/1.1\r\nHost: p.example.test\r\nConnection: close\r\n\r\n";
    let out = s_client(port, "p.example.test", &pki.ca_pem, &["-status"], request);
    assert!(out.contains("OCSP response: no response sent"), "no staple without a file: {out}");
}

#[test]
fn a_keep_alive_tls_client_keeps_its_one_connection_across_service_restarts() {
    let dir = TempDir::new();
    let pki = Pki::new(dir.path());
    let pm = Portmux::start(&[]);
    let port = free_port();
    let (cert, key) = pki.leaf("k.example.test");
    let spec = format!("https://k.example.test:{port}");
    let start =
        |body: &str| Service::hello(&pm, &spec, body, &["--name", "web", "--tls-cert", &cert, "--tls-key", &key]);
    let mut svc = start("v0");
    let name = rustls::pki_types::ServerName::try_from("k.example.test").unwrap();
    let conn = rustls::ClientConnection::new(pki.client_config(), name).unwrap();
    let sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let mut ask = || {
        write!(tls, "GET / HTTP/1.1\r\nHost: k.example.test\r\n\r\n").unwrap();
        let r = read_response(&mut tls).expect("the one connection keeps working");
        assert!(facts(&r).contains("sni=k.example.test"), "each instance learns the TLS facts: {}", r.head);
        r.body
    };
    assert_eq!(ask(), "v0");
    for version in 1..=3 {
        assert!(svc.terminate().is_some_and(|s| s.success()), "a graceful stop");
        svc = start(&format!("v{version}"));
        assert_eq!(ask(), format!("v{version}"), "the next instance answers on the same TLS connection");
    }
}

/// One request on a new connection with `cfg` as it is (resumption on): the
/// response, and whether the handshake was a resumed one.
fn resuming_request(cfg: Arc<rustls::ClientConfig>, port: u16, sni: &str) -> Result<(Response, bool), String> {
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
    let mut conn = rustls::ClientConnection::new(cfg, name).unwrap();
    let mut sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut tls = rustls::Stream::new(&mut conn, &mut sock);
    write!(tls, "GET / HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n").map_err(|e| e.to_string())?;
    let r = read_response(&mut tls).map_err(|e| e.to_string())?;
    Ok((r, conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed)))
}

#[test]
fn a_session_from_elsewhere_does_not_resume_past_a_client_certificate_requirement() {
    let dir = TempDir::new();
    let pki = Pki::new(dir.path());
    let pm = Portmux::start(&["--cert-dir", &dir.path().to_string_lossy()]);
    let (open, mutual) = (free_port(), free_port());
    // The same name on two ports, one of them asking for client certificates:
    // the client offers the session it got on one to the other (rustls keys
    // sessions by name, and so may an attacker).
    let (cert, key) = pki.leaf("m.example.test");
    let (_b, b) = Service::backend("behind", &[]);
    let ca = pki.ca_pem.display().to_string();
    add_route(&pm, &format!("https://m.example.test:{open}?cert={cert}&key={key}"), Some(&b.to_string())).unwrap();
    add_route(
        &pm,
        &format!("https://m.example.test:{mutual}?cert={cert}&key={key}&client_ca={ca}"),
        Some(&b.to_string()),
    )
    .unwrap();
    let cfg = pki.client_config();
    let (r, _) = resuming_request(cfg.clone(), open, "m.example.test").unwrap();
    assert_eq!(r.body, "behind");
    let (_, resumed) = resuming_request(cfg.clone(), open, "m.example.test").unwrap();
    assert!(resumed, "sessions resume where no client certificate is asked for");
    let bypass = resuming_request(cfg, mutual, "m.example.test");
    assert!(
        bypass.is_err(),
        "a session made without a client certificate must not resume on a client_ca route: {bypass:?}"
    );
}
