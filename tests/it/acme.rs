//! Certificates from ACME against a real ACME server: Debian's `pebble` on
//! loopback (with `pebble-challtestsrv` as its DNS, answering 127.0.0.1 for
//! every name), validating portmux's own HTTP-01 and TLS-ALPN-01 answers.

use crate::tls::tls_request;
use crate::util::*;
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A pebble ACME server and its DNS, ended when dropped.
struct Pebble {
    children: Vec<Child>,
    /// The directory URL.
    directory: String,
    /// The CA file that verifies pebble's own HTTPS.
    ca: PathBuf,
    management: u16,
}

impl Pebble {
    /// Validates HTTP-01 on `http_port` and TLS-ALPN-01 on `tls_port`;
    /// certificates live `validity` seconds (0: pebble's default).
    fn start(dir: &Path, http_port: u16, tls_port: u16, validity: u64) -> Pebble {
        Pebble::start_with(dir, http_port, tls_port, validity, None)
    }

    /// Like `start`; certificates name `ocsp` as their OCSP responder.
    fn start_with(dir: &Path, http_port: u16, tls_port: u16, validity: u64, ocsp: Option<u16>) -> Pebble {
        let pki = Pki::new(dir);
        let (cert, key) = pki.leaf("localhost");
        let (listen, management, dns) = (free_port(), free_port(), free_port());
        let mut config = serde_json::json!({"pebble": {
            "listenAddress": format!("127.0.0.1:{listen}"),
            "managementListenAddress": format!("127.0.0.1:{management}"),
            "certificate": cert, "privateKey": key,
            "httpPort": http_port, "tlsPort": tls_port,
            "ocspResponderURL": "", "externalAccountBindingRequired": false,
        }});
        if validity > 0 {
            config["pebble"]["certificateValidityPeriod"] = validity.into();
        }
        if let Some(port) = ocsp {
            config["pebble"]["ocspResponderURL"] = format!("http://127.0.0.1:{port}").into();
        }
        let config_path = dir.join("pebble.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        let quiet = |c: &mut Command| {
            c.stdout(Stdio::null()).stderr(Stdio::null());
        };
        let mut srv = Command::new("pebble-challtestsrv");
        srv.args(["-dns01", &format!("127.0.0.1:{dns}"), "-http01", "", "-https01", "", "-tlsalpn01", ""]);
        srv.args([
            "-management",
            &format!("127.0.0.1:{}", free_port()),
            "-defaultIPv4",
            "127.0.0.1",
            "-defaultIPv6",
            "",
        ]);
        quiet(&mut srv);
        let mut pebble = Command::new("pebble");
        pebble.args(["-config", &config_path.to_string_lossy(), "-dnsserver", &format!("127.0.0.1:{dns}")]);
        pebble.env("PEBBLE_VA_NOSLEEP", "1").env("PEBBLE_WFE_NONCEREJECT", "0").env("PEBBLE_AUTHZREUSE", "0");
        quiet(&mut pebble);
        let children =
            vec![srv.spawn().expect("pebble-challtestsrv is installed"), pebble.spawn().expect("pebble is installed")];
        let up = Instant::now();
        while TcpStream::connect(("127.0.0.1", listen)).is_err()
            || TcpStream::connect(("127.0.0.1", management)).is_err()
        {
            assert!(up.elapsed() < Duration::from_secs(20), "pebble did not start listening");
            std::thread::sleep(Duration::from_millis(50));
        }
        Pebble { children, directory: format!("https://localhost:{listen}/dir"), ca: pki.ca_pem.clone(), management }
    }

    /// What pebble's management interface serves at `path` (its CA certificates and keys).
    fn management(&self, path: &str) -> String {
        curl(&["--cacert", &self.ca.to_string_lossy(), &format!("https://localhost:{}{path}", self.management)])
    }

    /// A client configuration trusting what pebble issues (its root now).
    fn client_config(&self) -> Arc<rustls::ClientConfig> {
        use rustls::pki_types::{CertificateDer, pem::PemObject};
        let root = CertificateDer::from_pem_slice(self.management("/roots/0").as_bytes()).unwrap();
        client_config(&[root], rustls::DEFAULT_VERSIONS, None)
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn acme_args<'a>(pebble: &'a Pebble, state: &'a str, challenge: &'a str, http_port: &'a str) -> Vec<&'a str> {
    vec![
        "--acme-directory",
        &pebble.directory,
        "--acme-email",
        "ops@example.test",
        "--acme-ca",
        pebble.ca.to_str().unwrap(),
        "--acme-challenge",
        challenge,
        "--acme-http-port",
        http_port,
        "--state-dir",
        state,
    ]
}

/// Waits (bounded) until `host` on `port` is served with a certificate
/// `cfg` trusts, other than `not`; returns it.
fn wait_issued(cfg: &Arc<rustls::ClientConfig>, port: u16, host: &str, not: Option<&[u8]>, pm: &Portmux) -> Vec<u8> {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok((r, _, cert)) = tls_request(cfg.clone(), port, Some(host), "", host, "/")
            && r.status == 200
            && Some(cert.as_slice()) != not
        {
            return cert;
        }
        assert!(Instant::now() < until, "no certificate for {host} within 60 s:\n{}", pm.log());
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn acme_http01_issues_beside_a_service_on_port_80_and_renews_a_short_lived_certificate() {
    let dir = TempDir::new();
    let (http, https) = (free_port(), free_port());
    let pebble = Pebble::start(dir.path(), http, https, 30);
    let state = dir.path().join("state");
    let http_arg = http.to_string();
    let pm = Portmux::start(&acme_args(&pebble, &state.to_string_lossy(), "http-01", &http_arg));
    // A service holds plain HTTP for the very name: the challenge is answered all the same.
    let _site = Service::hello(&pm, &format!("http://a.acme.test:{http}"), "plain site", &[]);
    let (_b, b) = Service::backend("issued", &[]);
    let (ok, _, err) =
        portmux_cli(&pm, &["route", "add", &format!("https://a.acme.test:{https}?acme"), "--backend", &b.to_string()]);
    assert!(ok, "{err}");

    let cfg = pebble.client_config();
    let first = wait_issued(&cfg, https, "a.acme.test", None, &pm);
    assert_eq!(get(http, "a.acme.test", "/").unwrap().body, "plain site", "the service keeps its port");
    let kept = state.join("acme/certs/a.acme.test");
    assert_eq!(mode(&kept.join("key.pem")), 0o600);
    assert_eq!(mode(&kept.join("cert.pem")), 0o600);
    assert_eq!(mode(&state.join("acme")), 0o700);
    let account = std::fs::read_dir(state.join("acme"))
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("account-"));
    assert_eq!(mode(&account.expect("the account is kept").path()), 0o600);

    // A 30-second certificate is renewed with a third of its life left.
    let renewed = wait_issued(&cfg, https, "a.acme.test", Some(&first), &pm);
    assert_ne!(renewed, first);
    assert!(pm.count("certificate issued") >= 2, "{}", pm.log());
}

#[test]
fn acme_tls_alpn01_issues_and_the_kept_certificate_serves_after_a_restart() {
    let dir = TempDir::new();
    let https = free_port();
    let pebble = Pebble::start(dir.path(), free_port(), https, 0);
    let state = dir.path().join("state");
    let state_arg = state.to_string_lossy().into_owned();
    let args = acme_args(&pebble, &state_arg, "tls-alpn-01", "1");
    let mut pm = Portmux::start(&args);
    let (_b, b) = Service::backend("alpn", &[]);
    let spec = format!("https://b.acme.test:{https}?acme");
    let (ok, _, err) = portmux_cli(&pm, &["route", "add", &spec, "--backend", &b.to_string()]);
    assert!(ok, "{err}");
    let cfg = pebble.client_config();
    let issued = wait_issued(&cfg, https, "b.acme.test", None, &pm);
    assert!(pm.log().contains("answered an ACME TLS-ALPN-01 challenge"), "{}", pm.log());
    pm.terminate(Duration::from_secs(10));

    let mut pm = Portmux::start(&args);
    let (ok, _, err) = portmux_cli(&pm, &["route", "add", &spec, "--backend", &b.to_string()]);
    assert!(ok, "{err}");
    let (r, _, served) = tls_request(cfg.clone(), https, Some("b.acme.test"), "", "b.acme.test", "/").unwrap();
    assert_eq!((r.body.as_str(), served), ("alpn", issued.clone()), "the kept certificate is served at once");
    pm.upgrade(&[]).unwrap();
    let (r, _, served) = tls_request(cfg, https, Some("b.acme.test"), "", "b.acme.test", "/").unwrap();
    assert_eq!((r.body.as_str(), served), ("alpn", issued), "and by the new process after an upgrade");
    assert_eq!(pm.count("ordering a certificate"), 0, "no new order: {}", pm.log());
}

#[test]
fn acme_routes_are_refused_without_an_account_or_for_a_wildcard() {
    let pm = Portmux::start(&[]);
    let port = free_port();
    let (ok, _, err) =
        portmux_cli(&pm, &["route", "add", &format!("https://x.test:{port}?acme"), "--backend", "127.0.0.1:1"]);
    assert!(!ok && err.contains("--acme-email"), "{err}");
    let dir = TempDir::new();
    let state = dir.path().join("state");
    let pm = Portmux::start(&["--acme-email", "ops@example.test", "--state-dir", &state.to_string_lossy()]);
    let (ok, _, err) =
        portmux_cli(&pm, &["route", "add", &format!("https://*.x.test:{port}?acme"), "--backend", "127.0.0.1:1"]);
    assert!(!ok && err.contains("DNS-01"), "{err}");
}

#[test]
fn an_acme_certificate_gets_an_ocsp_staple_from_the_responder_it_names() {
    let dir = TempDir::new();
    let (https, ocsp) = (free_port(), free_port());
    let pebble = Pebble::start_with(dir.path(), free_port(), https, 0, Some(ocsp));
    let state = dir.path().join("state");
    let state_arg = state.to_string_lossy().into_owned();
    let mut pm = Portmux::start(&acme_args(&pebble, &state_arg, "tls-alpn-01", "1"));
    let (_b, b) = Service::backend("stapled", &[]);
    let spec = format!("https://o.acme.test:{https}?acme");
    let (ok, _, err) = portmux_cli(&pm, &["route", "add", &spec, "--backend", &b.to_string()]);
    assert!(ok, "{err}");
    let cfg = pebble.client_config();
    wait_issued(&cfg, https, "o.acme.test", None, &pm);

    // An OCSP response for the issued certificate, "good", signed with
    // pebble's intermediate key by openssl's responder (one shot), and an
    // HTTP responder on loopback that answers every POST with it.
    let d = dir.path();
    std::fs::write(d.join("issuer.pem"), pebble.management("/intermediates/0")).unwrap();
    std::fs::write(d.join("issuer.key"), pebble.management("/intermediate-keys/0")).unwrap();
    let cert = state.join("acme/certs/o.acme.test/cert.pem");
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(d).output().unwrap();
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let cert_arg = cert.to_string_lossy();
    let serial =
        openssl(&["x509", "-noout", "-serial", "-in", &cert_arg]).trim().trim_start_matches("serial=").to_string();
    std::fs::write(d.join("index.txt"), format!("V\t391231235959Z\t\t{serial}\tunknown\t/CN=o.acme.test\n")).unwrap();
    openssl(&["ocsp", "-issuer", "issuer.pem", "-cert", &cert_arg, "-reqout", "req.der", "-no_nonce"]);
    let sign = |signer: &str, key: &str, out: &str| {
        openssl(
            &[
                "ocsp",
                "-index",
                "index.txt",
                "-rsigner",
                signer,
                "-rkey",
                key,
                "-CA",
                "issuer.pem",
                "-reqin",
                "req.der",
            ]
            .into_iter()
            .chain(["-respout", out, "-ndays", "1"])
            .collect::<Vec<_>>(),
        );
        std::fs::read(d.join(out)).unwrap()
    };
    let good = sign("issuer.pem", "issuer.key", "good.der");
    // The same "good" answer signed with another CA's key (the one that made pebble's HTTPS certificate).
    let forged = sign("ca.pem", "ca.key", "forged.der");
    let answer = Arc::new(std::sync::Mutex::new(forged));
    let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let responder = std::net::TcpListener::bind(("127.0.0.1", ocsp)).unwrap();
    let (serving, counting) = (answer.clone(), asked.clone());
    std::thread::spawn(move || {
        for mut s in responder.incoming().flatten().take(20) {
            let _ = read_request(&mut s);
            let body = serving.lock().unwrap().clone();
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/ocsp-response\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = std::io::Write::write_all(&mut s, head.as_bytes());
            let _ = std::io::Write::write_all(&mut s, &body);
            counting.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let roots = d.join("roots.pem");
    std::fs::write(&roots, pebble.management("/roots/0") + &pebble.management("/intermediates/0")).unwrap();
    let status = || {
        let out = Command::new("openssl")
            .args(["s_client", "-connect", &format!("127.0.0.1:{https}"), "-servername", "o.acme.test", "-status"])
            .arg("-CAfile")
            .arg(&roots)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let kept = state.join("acme/certs/o.acme.test/ocsp.der");
    // The first attempt (at issuance) found no responder; the new process of
    // an upgrade asks again at start, and gets the forged answer: refused.
    pm.upgrade(&[]).unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    while asked.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(Instant::now() < until, "portmux did not ask the responder:\n{}", pm.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    for _ in 0..5 {
        let text = status();
        assert!(text.contains("OCSP response: no response sent"), "a forged answer is not stapled: {text}");
        assert!(!kept.exists(), "nor kept");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The issuer's own answer is stapled, by the next process, which asks at start.
    *answer.lock().unwrap() = good;
    pm.upgrade(&[]).unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let text = status();
        if text.contains("OCSP Response Status: successful") {
            assert!(text.contains("Cert Status: good"), "{text}");
            break;
        }
        assert!(Instant::now() < until, "no staple within 30 s:\n{text}\n{}", pm.log());
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(kept.exists(), "the staple is kept");
}

/// Reads an HTTP request's head and its Content-Length body.
fn read_request(s: &mut TcpStream) -> std::io::Result<()> {
    use std::io::Read;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            return Ok(());
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let len = head.lines().find_map(|l| l.strip_prefix("content-length:")?.trim().parse::<usize>().ok()).unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)
}
