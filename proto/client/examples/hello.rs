//! A tiny service built on portmux: claims a route and answers every HTTP/1.1
//! request on every connection it is handed with the same body (keep-alive
//! honoured). With `--tls-cert/--tls-key` it terminates TLS itself on the
//! handed-off connection (a `tls://` route: portmux never sees plaintext);
//! on an `https://` route it sends the certificate to portmux, which
//! terminates TLS, and answers with an `X-Portmux-Tls` header saying what the
//! handshake settled (version, cipher, SNI, ALPN, client certificates).
//!
//! With `--listen ADDR` it listens on ADDR itself instead (no portmux): the
//! same server as a plain backend, or as the "direct" baseline of a benchmark.
//! `--size BYTES` repeats BODY to that many bytes (large responses).
//! `--down-file FILE`: while FILE exists, every request is answered 503 (a
//! service failing its health check, `?health=/PATH` on its route).
//!
//! SIGTERM or SIGINT shut it down gracefully: portmux sends it nothing new
//! (the next instance, or another of the same name, gets it), requests in
//! progress finish, and every keep-alive connection goes back to portmux
//! between requests, for the next instance: clients never notice a restart.
//!
//! ```text
//! hello SPEC BODY [--name NAME] [--control PATH] [--tls-cert PEM --tls-key PEM] [--size BYTES] [--down-file FILE]
//! hello --listen ADDR BODY [--tls-cert PEM --tls-key PEM] [--size BYTES]
//! hello 'http://:8000/a' 'From A'
//! ```

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use tokio_rustls::TlsAcceptor;

const USAGE: &str = "usage: hello SPEC BODY [--name NAME] [--control PATH] [--tls-cert PEM --tls-key PEM] \
                     [--size BYTES] [--down-file FILE]\n       hello --listen ADDR BODY [--tls-cert PEM --tls-key PEM] \
                     [--size BYTES] [--down-file FILE]";

/// `--down-file`: while it exists, requests are answered 503.
static DOWN_FILE: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

struct Args {
    /// A route spec, or with `listen` the address to listen on.
    spec: String,
    listen: bool,
    body: String,
    name: Option<String>,
    control: Option<String>,
    cert: Option<String>,
    key: Option<String>,
    size: Option<usize>,
}

fn parse_args() -> Result<Args, String> {
    let mut positional = Vec::new();
    let (mut name, mut control, mut cert, mut key, mut listen, mut size) = (None, None, None, None, None, None);
    let mut down = None;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let slot = match a.as_str() {
            "--name" => &mut name,
            "--control" => &mut control,
            "--tls-cert" => &mut cert,
            "--tls-key" => &mut key,
            "--listen" => &mut listen,
            "--size" => &mut size,
            "--down-file" => &mut down,
            "-h" | "--help" => return Err(USAGE.into()),
            s if s.starts_with("--") => return Err(format!("unknown option {s}\n{USAGE}")),
            _ => {
                positional.push(a);
                continue;
            }
        };
        *slot = Some(it.next().ok_or_else(|| format!("{a} needs a value\n{USAGE}"))?);
    }
    // With --listen the address takes the place of the route spec.
    let direct = listen.is_some();
    positional.splice(0..0, listen);
    let [spec, body]: [String; 2] = positional.try_into().map_err(|_| USAGE.to_string())?;
    if cert.is_some() != key.is_some() {
        return Err("--tls-cert and --tls-key go together".into());
    }
    let size = match size {
        Some(s) => Some(s.parse().map_err(|_| format!("--size {s} is not a number of bytes"))?),
        None => None,
    };
    if let Some(d) = down {
        let _ = DOWN_FILE.set(d.into());
    }
    if body.is_empty() && size.is_some() {
        return Err("--size needs a non-empty BODY to repeat".into());
    }
    Ok(Args { spec, listen: direct, body, name, control, cert, key, size })
}

fn tls_acceptor(cert: &str, key: &str) -> Result<TlsAcceptor, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read certificates from {cert}: {e}"))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("cannot read the private key {key}: {e}"))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("bad certificate or key: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let portmux_terminates = args.spec.starts_with("https:");
    let tls = match (&args.cert, &args.key) {
        _ if portmux_terminates => None,
        (Some(c), Some(k)) => match tls_acceptor(c, k) {
            Ok(a) => Some(a),
            Err(e) => {
                eprintln!("hello: {e}");
                return ExitCode::FAILURE;
            }
        },
        _ => None,
    };
    let body = match args.size {
        Some(n) => Bytes::from(args.body.bytes().cycle().take(n).collect::<Vec<u8>>()),
        None => Bytes::from(args.body.clone()),
    };
    if args.listen {
        return listen_directly(&args.spec, tls, body).await;
    }
    // Signals are taken before the route is claimed: a SIGTERM right after
    // "registered" is a graceful stop, not the default death.
    use tokio::signal::unix::{SignalKind, signal};
    let (mut term, mut int) = match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(t), Ok(i)) => (t, i),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("hello: cannot take signals: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut builder = portmux_client::Builder::new().route(&args.spec);
    if let Some(n) = &args.name {
        builder = builder.name(n);
    }
    if let Some(c) = &args.control {
        builder = builder.control(c);
    }
    if let (true, Some(cert), Some(key)) = (portmux_terminates, &args.cert, &args.key) {
        match (std::fs::read_to_string(cert), std::fs::read_to_string(key)) {
            (Ok(chain), Ok(key)) => builder = builder.certificate(chain, key),
            (Err(e), _) | (_, Err(e)) => {
                eprintln!("hello: cannot read the certificate or key: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let mut listener = match builder.bind_async().await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("hello: {e}");
            return ExitCode::FAILURE;
        }
    };
    for b in listener.routes() {
        println!("hello: registered {} on {} as service '{}'", b.route, b.listen, listener.name());
    }
    let _ = std::io::stdout().flush();

    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, info)) => {
                    let _ = stream.set_nodelay(true);
                    let facts = info.tls.as_ref().map(|t| {
                        format!(
                            "version={}; cipher={}; sni={}; alpn={}; client-certs={}",
                            t.version,
                            t.cipher,
                            t.sni.as_deref().unwrap_or("-"),
                            t.alpn.as_deref().unwrap_or("-"),
                            t.client_certs.len()
                        )
                    });
                    tokio::spawn(serve(stream, tls.clone(), body.clone(), facts));
                }
                Err(e) => {
                    eprintln!("hello: accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    // Requests in progress finish; keep-alive connections go back to portmux
    // between requests.
    match listener.shutdown(std::time::Duration::from_secs(10)).await {
        Ok(0) => println!("hello: stopped"),
        Ok(n) => println!("hello: stopped with {n} connections still open"),
        Err(e) => eprintln!("hello: shutdown: {e}"),
    }
    ExitCode::SUCCESS
}

/// A listening socket with the backlog portmux's own listeners have (4096),
/// so a burst of connections is not dropped where portmux would take it.
async fn listen_on(addr: &str) -> std::io::Result<tokio::net::TcpListener> {
    let mut last = std::io::Error::new(std::io::ErrorKind::InvalidInput, "the address resolves to nothing");
    for a in tokio::net::lookup_host(addr).await? {
        let socket = if a.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        match socket.bind(a).and_then(|()| socket.listen(4096)) {
            Ok(l) => return Ok(l),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Serves on a listening socket of its own, without portmux.
async fn listen_directly(addr: &str, tls: Option<TlsAcceptor>, body: Bytes) -> ExitCode {
    let listener = match listen_on(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("hello: cannot listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("hello: listening on {}", listener.local_addr().map_or_else(|_| addr.to_string(), |a| a.to_string()));
    let _ = std::io::stdout().flush();
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(serve(stream, tls.clone(), body.clone(), None));
            }
            Err(e) => {
                eprintln!("hello: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn serve<S>(stream: S, tls: Option<TlsAcceptor>, body: Bytes, facts: Option<String>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |req: Request<Incoming>| {
        let body = body.clone();
        let facts = facts.clone();
        async move {
            // Read the request body to the end so the connection can be reused.
            let mut incoming = req.into_body();
            while let Some(frame) = incoming.frame().await {
                if frame.is_err() {
                    break;
                }
            }
            let down = DOWN_FILE.get().is_some_and(|f| f.exists());
            let mut response = Response::new(Full::new(if down { Bytes::from_static(b"down\n") } else { body }));
            if down {
                *response.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
            }
            if let Some(v) = facts.and_then(|f| hyper::header::HeaderValue::from_str(&f).ok()) {
                response.headers_mut().insert("x-portmux-tls", v);
            }
            Ok::<_, Infallible>(response)
        }
    });
    // A client may shut down its sending side once its request is out and
    // still wait for the answer (HTTP/1.0 style, `nc -N`): answer it.
    let mut http = hyper::server::conn::http1::Builder::new();
    http.half_close(true);
    let _ = match tls {
        Some(acceptor) => match acceptor.accept(stream).await {
            Ok(s) => http.serve_connection(TokioIo::new(s), service).await,
            Err(_) => return,
        },
        None => http.serve_connection(TokioIo::new(stream), service).await,
    };
}
