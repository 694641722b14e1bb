//! TLS termination: `https://` routes served with certificates from files or
//! from the registering service, chosen by SNI, next to `tls://`
//! passthrough on one port; the 421 rule, redirects to https, client
//! certificates, certificate reloads, and resumption across an upgrade.

use crate::util::*;
use std::io::Write;
use std::net::TcpStream;
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

fn tls12_only(cfg: &rustls::ClientConfig, pki: &Pki) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der()).unwrap();
    let mut c = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.alpn_protocols = cfg.alpn_protocols.clone();
    Arc::new(c)
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
    let (r, version, _) =
        tls_request(tls12_only(&cfg, &pki), port, Some("svc.example.test"), "", "svc.example.test", "/").unwrap();
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
}
