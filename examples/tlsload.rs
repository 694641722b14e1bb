//! A TLS load generator for `bench/run`: CONNS threads, each making requests
//! on a new TLS connection per request (full handshakes, or with `--resume`
//! resumed ones from tickets the server sent), or on one keep-alive
//! connection each (`--keepalive`), for DURATION seconds. wrk makes no
//! resumed handshakes, hence this. Prints one JSON line: requests, requests
//! per second, errors, resumed handshakes, p50 and p99 latency (ms).
//!
//! ```text
//! tlsload 127.0.0.1:8443 localhost --conns 50 --duration 5 [--resume | --keepalive]
//! ```

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The benchmark's certificate is self-signed and made for the run: any is accepted.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Reads one response framed by Content-Length; false on anything else.
fn read_response(s: &mut impl Read, buf: &mut Vec<u8>) -> bool {
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let ok = head.starts_with("http/1.1 200");
            let len = head.lines().find_map(|l| l.strip_prefix("content-length:")?.trim().parse::<usize>().ok());
            let Some(len) = len else { return false };
            while buf.len() < end + 4 + len {
                match s.read(&mut chunk) {
                    Ok(0) | Err(_) => return false,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            return ok;
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

#[derive(Default)]
struct Tally {
    requests: u64,
    errors: u64,
    resumed: u64,
    latencies: Vec<f64>,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: tlsload ADDR SNI [--conns N] [--duration S] [--resume | --keepalive]";
    let (Some(addr), Some(sni)) = (args.first().cloned(), args.get(1).cloned()) else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let opt = |name: &str, default: u64| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (conns, secs) = (opt("--conns", 50), opt("--duration", 5));
    let (resume, keepalive) = (args.iter().any(|a| a == "--resume"), args.iter().any(|a| a == "--keepalive"));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    if !resume {
        cfg.resumption = rustls::client::Resumption::disabled();
    }
    let cfg = Arc::new(cfg);
    let name = ServerName::try_from(sni.clone()).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let workers: Vec<_> = (0..conns)
        .map(|_| {
            let (cfg, name, addr, stop, host) = (cfg.clone(), name.clone(), addr.clone(), stop.clone(), sni.clone());
            std::thread::spawn(move || {
                let mut t = Tally::default();
                let mut buf = Vec::with_capacity(8192);
                let close = if keepalive { "" } else { "Connection: close\r\n" };
                let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\n{close}\r\n");
                'connections: while !stop.load(Ordering::Relaxed) {
                    let Ok(sock) = TcpStream::connect(&addr) else {
                        t.errors += 1;
                        continue;
                    };
                    let _ = sock.set_nodelay(true);
                    let _ = sock.set_read_timeout(Some(Duration::from_secs(10)));
                    let mut tls = rustls::StreamOwned::new(
                        rustls::ClientConnection::new(cfg.clone(), name.clone()).unwrap(),
                        sock,
                    );
                    loop {
                        let began = Instant::now();
                        if tls.write_all(request.as_bytes()).is_err() || !read_response(&mut tls, &mut buf) {
                            t.errors += 1;
                            continue 'connections;
                        }
                        t.requests += 1;
                        t.latencies.push(began.elapsed().as_secs_f64() * 1000.0);
                        if !keepalive {
                            if tls.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
                                t.resumed += 1;
                            }
                            // Read the tickets that follow and the close, as a browser would.
                            let _ = tls.read(&mut [0u8; 64]);
                            continue 'connections;
                        }
                        if stop.load(Ordering::Relaxed) {
                            break 'connections;
                        }
                    }
                }
                t
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(secs));
    stop.store(true, Ordering::Relaxed);
    let mut all = Tally::default();
    for w in workers {
        let t = w.join().unwrap();
        all.requests += t.requests;
        all.errors += t.errors;
        all.resumed += t.resumed;
        all.latencies.extend(t.latencies);
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        all.latencies
            .get(((all.latencies.len() as f64 * p) as usize).min(all.latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    println!(
        "{{\"requests\": {}, \"rps\": {:.1}, \"errors\": {}, \"resumed\": {}, \"p50\": {:.3}, \"p99\": {:.3}}}",
        all.requests,
        all.requests as f64 / elapsed,
        all.errors,
        all.resumed,
        pct(0.5),
        pct(0.99)
    );
}
