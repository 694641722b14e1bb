//! TLS termination with rustls: the server configuration of each `https://`
//! route (its certificate, its client-certificate rule, the shared ticket
//! keys), the handshake with its deadline, and what the handshake tells a
//! service.

pub mod acme;
pub mod certs;
pub mod ocsp;
pub mod tickets;

use certs::{CertError, CertSlot};
use portmux_wire::TlsInfo;
use rustls::server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache, StoresServerSessions};
use rustls::sign::CertifiedKey;
use rustls::{ServerConfig, ServerConnection};
use std::io;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tickets::Tickets;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// A terminated client connection.
pub type Stream = tokio_rustls::server::TlsStream<TcpStream>;

/// What every route's server configuration shares: the ticket keys and the
/// session cache (for TLS 1.2 clients that resume by session id).
#[derive(Debug, Clone)]
pub struct Context {
    pub tickets: Arc<Tickets>,
    cache: Arc<dyn StoresServerSessions>,
    /// The ACME challenges being validated now.
    pub challenges: Arc<acme::Challenges>,
}

impl Context {
    /// Fresh ticket keys rotated every `rotation`.
    pub fn new(rotation: Duration) -> Context {
        // The kernel's getrandom does not fail once the system has booted.
        let tickets = Tickets::new(rotation).expect("the system's random number generator failed");
        Context { tickets: Arc::new(tickets), cache: ServerSessionMemoryCache::new(4096), challenges: Arc::default() }
    }

    /// The server side of an `https://` route: `cert`, and when `client_ca`
    /// names a file, a client certificate signed by one of its CAs is required.
    /// `h2`: offer HTTP/2 (ALPN `h2`) besides HTTP/1.1, for routes whose
    /// requests the engine serves one by one.
    pub fn terminator(&self, cert: Arc<CertSlot>, client_ca: Option<&Path>, h2: bool) -> Result<Terminator, CertError> {
        let ring = rustls::crypto::ring::default_provider();
        // AES-128-GCM first, whatever the client's order: the same security as
        // AES-256 here, and a SHA-256 key schedule instead of SHA-384.
        let mut aes = ring.clone();
        aes.cipher_suites.sort_by_key(|s| match s.suite() {
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
            rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 => 1,
            rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 1,
            _ => 2,
        });
        let roots = client_ca.map(|path| client_roots(path).map(|r| (path, r))).transpose()?;
        let config = self.config(Arc::new(aes), &cert, roots.as_ref(), true, h2)?;
        let chacha = self.config(Arc::new(ring), &cert, roots.as_ref(), false, h2)?;
        Ok(Terminator { config: Arc::new(config), chacha: Arc::new(chacha), cert })
    }

    /// One of a terminator's configurations; `client_ca`: the CA file and its certificates.
    fn config(
        &self,
        provider: Arc<rustls::crypto::CryptoProvider>,
        cert: &Arc<CertSlot>,
        client_ca: Option<&(&Path, Arc<rustls::RootCertStore>)>,
        server_order: bool,
        h2: bool,
    ) -> Result<ServerConfig, CertError> {
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| CertError::Invalid { what: "the TLS configuration".into(), reason: e.to_string() })?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some((path, roots)) => {
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider)
                    .build()
                    .map_err(|e| invalid(path, format!("cannot verify clients with it: {e}")))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = if cert.is_acme() {
            let challenges = self.challenges.clone();
            builder.with_cert_resolver(Arc::new(AcmeResolver { slot: cert.clone(), challenges }))
        } else {
            builder.with_cert_resolver(Arc::new(Resolver(cert.clone())))
        };
        config.alpn_protocols =
            if h2 { vec![b"h2".to_vec(), b"http/1.1".to_vec()] } else { vec![b"http/1.1".to_vec()] };
        if cert.is_acme() {
            config.alpn_protocols.push(acme::ALPN.to_vec());
        }
        if client_ca.is_none() {
            config.ticketer = self.tickets.clone();
            config.session_storage = self.cache.clone();
        }
        // A route that asks for client certificates keeps its sessions to
        // itself (rustls's own cache, no shared tickets): a session made
        // anywhere else, without a client certificate, cannot resume here.
        config.ignore_client_order = server_order;
        Ok(config)
    }
}

/// The CA certificates of a `client_ca` file.
fn client_roots(path: &Path) -> Result<Arc<rustls::RootCertStore>, CertError> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let pem = std::fs::read(path).map_err(|source| CertError::Read { path: path.into(), source })?;
    let mut roots = rustls::RootCertStore::empty();
    for der in CertificateDer::pem_slice_iter(&pem) {
        let der = der.map_err(|e| invalid(path, format!("not a PEM certificate ({e})")))?;
        roots.add(der).map_err(|e| invalid(path, format!("not a usable CA certificate: {e}")))?;
    }
    if roots.is_empty() {
        return Err(invalid(path, "no CERTIFICATE block in it".into()));
    }
    Ok(Arc::new(roots))
}

fn invalid(path: &Path, reason: String) -> CertError {
    CertError::Invalid { what: path.display().to_string(), reason }
}

/// The server side of one `https://` route.
#[derive(Debug)]
pub struct Terminator {
    /// For clients that put an AES suite first: AES-128-GCM is chosen.
    pub config: Arc<ServerConfig>,
    /// For clients that put ChaCha20-Poly1305 first (no AES hardware, as
    /// Go's and BoringSSL's servers judge it): the client's order.
    pub chacha: Arc<ServerConfig>,
    pub cert: Arc<CertSlot>,
}

impl Terminator {
    /// The configuration for a client whose first cipher suite is ChaCha20 (`chacha_first`) or not.
    pub fn for_client(&self, chacha_first: bool) -> Arc<ServerConfig> {
        if chacha_first { self.chacha.clone() } else { self.config.clone() }
    }
}

/// Serves the route's certificate (reloaded in place when its files change).
#[derive(Debug)]
struct Resolver(Arc<CertSlot>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.current()
    }
}

/// An ACME route's certificate, or the TLS-ALPN-01 challenge's when the
/// validator asks for `acme-tls/1` (RFC 8737).
#[derive(Debug)]
struct AcmeResolver {
    slot: Arc<CertSlot>,
    challenges: Arc<acme::Challenges>,
}

impl ResolvesServerCert for AcmeResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let only_acme = hello.alpn().is_some_and(|mut a| a.next() == Some(acme::ALPN) && a.next().is_none());
        if only_acme {
            return self.challenges.tls_alpn(hello.server_name()?);
        }
        self.slot.current()
    }
}

/// Why a handshake did not complete.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("the handshake did not complete within the deadline")]
    TimedOut,
    #[error("handshake failed: {0}")]
    Failed(io::Error),
}

/// Runs the server handshake on the client's socket (its ClientHello only
/// peeked so far), by `deadline`. On a failure rustls has sent its alert.
pub async fn handshake(fd: OwnedFd, config: Arc<ServerConfig>, deadline: Instant) -> Result<Stream, HandshakeError> {
    let std = std::net::TcpStream::from(fd);
    let prepared =
        std.set_nonblocking(true).and_then(|()| std.set_nodelay(true)).and_then(|()| TcpStream::from_std(std));
    let tcp = prepared.map_err(HandshakeError::Failed)?;
    let accept = tokio_rustls::TlsAcceptor::from(config).accept(tcp);
    match tokio::time::timeout_at(deadline, accept).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(HandshakeError::Failed(e)),
        Err(_) => Err(HandshakeError::TimedOut),
    }
}

/// The TLS facts of a completed handshake, for the service.
pub fn info(conn: &ServerConnection) -> TlsInfo {
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    };
    let cipher = conn
        .negotiated_cipher_suite()
        .map(|s| s.suite().as_str().map_or_else(|| format!("{:?}", s.suite()), str::to_string))
        .unwrap_or_default();
    TlsInfo {
        sni: conn.server_name().map(str::to_ascii_lowercase),
        alpn: conn.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned()),
        version,
        cipher,
        client_certs: conn.peer_certificates().map(|c| c.iter().map(|d| d.to_vec()).collect()).unwrap_or_default(),
    }
}
