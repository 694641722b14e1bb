//! What ACME (RFC 8555) needs beside the protocol client: the challenges
//! portmux answers (HTTP-01 key authorizations, TLS-ALPN-01 certificates),
//! the state directory's files (the account, the certificates and their
//! keys, mode 0600, written atomically), and when to renew and when to retry.

use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// The ALPN protocol of TLS-ALPN-01 validation (RFC 8737).
pub const ALPN: &[u8] = b"acme-tls/1";
/// Where HTTP-01 tokens are asked for.
pub const HTTP_PREFIX: &str = "/.well-known/acme-challenge/";

/// The challenges being validated now, read by the workers.
#[derive(Debug, Default)]
pub struct Challenges {
    /// HTTP-01: token → key authorization.
    http: Mutex<HashMap<String, String>>,
    /// TLS-ALPN-01: name → its challenge certificate.
    alpn: Mutex<HashMap<String, Arc<CertifiedKey>>>,
    /// HTTP-01 tokens pending (workers look only when there are some).
    http_pending: AtomicUsize,
}

impl Challenges {
    /// The answer to `GET target`, if it asks for a pending HTTP-01 token.
    pub fn http_answer(&self, target: &str) -> Option<String> {
        if self.http_pending.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let token = target.strip_prefix(HTTP_PREFIX)?;
        self.http.lock().unwrap_or_else(|p| p.into_inner()).get(token).cloned()
    }

    /// The TLS-ALPN-01 certificate for `name`.
    pub fn tls_alpn(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        self.alpn.lock().unwrap_or_else(|p| p.into_inner()).get(&name.to_ascii_lowercase()).cloned()
    }

    pub fn set_http(&self, token: &str, key_authorization: &str) {
        let mut http = self.http.lock().unwrap_or_else(|p| p.into_inner());
        http.insert(token.into(), key_authorization.into());
        self.http_pending.store(http.len(), Ordering::Relaxed);
    }

    pub fn remove_http(&self, token: &str) {
        let mut http = self.http.lock().unwrap_or_else(|p| p.into_inner());
        http.remove(token);
        self.http_pending.store(http.len(), Ordering::Relaxed);
    }

    pub fn set_tls_alpn(&self, name: &str, cert: CertifiedKey) {
        self.alpn.lock().unwrap_or_else(|p| p.into_inner()).insert(name.into(), Arc::new(cert));
    }

    pub fn remove_tls_alpn(&self, name: &str) {
        self.alpn.lock().unwrap_or_else(|p| p.into_inner()).remove(name);
    }
}

/// The self-signed certificate TLS-ALPN-01 validation expects for `name`:
/// its SAN is the name, and a critical acmeIdentifier extension holds the
/// SHA-256 digest of the key authorization.
pub fn challenge_cert(name: &str, digest: &[u8]) -> Result<CertifiedKey, String> {
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).map_err(|e| e.to_string())?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    let der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| e.to_string())?;
    // Made together, so they match: no check (webpki would refuse the
    // critical acmeIdentifier extension it does not know).
    let signing = rustls::crypto::ring::sign::any_supported_type(&der).map_err(|e| e.to_string())?;
    Ok(CertifiedKey::new(vec![cert.der().clone()], signing))
}

/// The state directory's ACME files.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// ACME's files under `state_dir/acme`.
    pub fn new(state_dir: &Path) -> Store {
        Store { dir: state_dir.join("acme") }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The account file for `directory` (one per ACME server).
    pub fn account_path(&self, directory: &str) -> PathBuf {
        let digest = ring::digest::digest(&ring::digest::SHA256, directory.as_bytes());
        let hex: String = digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
        self.dir.join(format!("account-{hex}.json"))
    }

    fn cert_dir(&self, host: &str) -> PathBuf {
        // Host names are normalised (letters, digits, '-', '_', '.'); a
        // wildcard's '*' is spelled out.
        self.dir.join("certs").join(host.replace('*', "_wildcard_"))
    }

    /// The certificate chain and key kept for `host`, if any.
    pub fn load(&self, host: &str) -> io::Result<Option<(String, zeroize::Zeroizing<String>)>> {
        let dir = self.cert_dir(host);
        match std::fs::read_to_string(dir.join("cert.pem")) {
            Ok(chain) => Ok(Some((chain, zeroize::Zeroizing::new(std::fs::read_to_string(dir.join("key.pem"))?)))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The OCSP response kept for `host`'s certificate, if any.
    pub fn load_ocsp(&self, host: &str) -> Option<Vec<u8>> {
        std::fs::read(self.cert_dir(host).join("ocsp.der")).ok()
    }

    /// Keeps the OCSP response for `host`'s certificate.
    pub fn save_ocsp(&self, host: &str, der: &[u8]) -> io::Result<()> {
        write_private(&self.cert_dir(host).join("ocsp.der"), der)
    }

    /// Keeps a new certificate for `host` (the key first: a crash between
    /// the two leaves the old certificate with a key it does not match,
    /// which is refused at load, and then a new order is made).
    pub fn save(&self, host: &str, chain: &str, key: &str) -> io::Result<()> {
        let dir = self.cert_dir(host);
        create_private_dir(&dir)?;
        write_private(&dir.join("key.pem"), key.as_bytes())?;
        write_private(&dir.join("cert.pem"), chain.as_bytes())?;
        // A staple of the previous certificate is not this one's.
        match std::fs::remove_file(dir.join("ocsp.der")) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// Creates `dir` (and its parents) readable by its owner only.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    // Through the open directory (fchmod: the sandbox allows no chmod by path).
    std::fs::File::open(dir)?.set_permissions(std::fs::Permissions::from_mode(0o700))
}

/// Writes `path` atomically with mode 0600: a temporary file beside it,
/// fsync, rename, then fsync of the directory.
pub fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("file")));
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// The validity of the first certificate of a PEM chain.
pub fn validity(chain_pem: &str) -> Option<(SystemTime, SystemTime)> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    validity_der(&CertificateDer::pem_slice_iter(chain_pem.as_bytes()).next()?.ok()?)
}

/// The validity of a certificate (DER).
pub fn validity_der(der: &[u8]) -> Option<(SystemTime, SystemTime)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let at = |t: x509_parser::time::ASN1Time| {
        let secs = t.timestamp();
        u64::try_from(secs).ok().map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s))
    };
    Some((at(cert.validity().not_before)?, at(cert.validity().not_after)?))
}

/// When to renew a certificate valid from `not_before` to `not_after`:
/// `renew_before` its end, or with a third of its life left if that is
/// sooner (short-lived certificates).
pub fn renew_at(not_before: SystemTime, not_after: SystemTime, renew_before: Duration) -> SystemTime {
    let life = not_after.duration_since(not_before).unwrap_or_default();
    not_after - renew_before.min(life / 3)
}

/// How long to wait before attempt `failures + 1` after that many failed in a
/// row: 1 minute doubling to a day, at least an hour when the server said it
/// is rate limiting, each with up to a fifth more at random (so many
/// instances do not retry together).
pub fn backoff(failures: u32, rate_limited: bool, random: u32) -> Duration {
    let base = Duration::from_secs(60).saturating_mul(1u32 << failures.min(11)).min(Duration::from_secs(86_400));
    let base = if rate_limited { base.max(Duration::from_secs(3600)) } else { base };
    base + base / 5 * (random % 1000) / 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_due_thirty_days_before_the_end_or_with_a_third_of_a_short_life_left() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let day = Duration::from_secs(86_400);
        let month = 30 * day;
        assert_eq!(renew_at(t0, t0 + 90 * day, month), t0 + 60 * day, "Let's Encrypt's 90 days");
        assert_eq!(renew_at(t0, t0 + Duration::from_secs(30), month), t0 + Duration::from_secs(20));
    }

    #[test]
    fn retries_back_off_with_jitter_and_respect_rate_limits() {
        assert_eq!(backoff(0, false, 0), Duration::from_secs(60));
        assert_eq!(backoff(1, false, 0), Duration::from_secs(120));
        assert_eq!(backoff(30, false, 0), Duration::from_secs(86_400), "at most a day");
        assert_eq!(backoff(0, true, 0), Duration::from_secs(3600), "rate limited: at least an hour");
        let jittered = backoff(0, false, 999);
        assert!(jittered > Duration::from_secs(60) && jittered <= Duration::from_secs(72), "{jittered:?}");
    }

    #[test]
    fn http_challenges_answer_only_their_tokens_and_files_are_private() {
        let c = Challenges::default();
        assert_eq!(c.http_answer("/.well-known/acme-challenge/t1"), None);
        c.set_http("t1", "t1.thumb");
        assert_eq!(c.http_answer("/.well-known/acme-challenge/t1").as_deref(), Some("t1.thumb"));
        assert_eq!(c.http_answer("/.well-known/acme-challenge/t2"), None);
        assert_eq!(c.http_answer("/t1"), None);
        c.remove_http("t1");
        assert_eq!(c.http_answer("/.well-known/acme-challenge/t1"), None);

        let dir = std::env::temp_dir().join(format!("portmux-acme-{}", std::process::id()));
        let store = Store::new(&dir);
        store.save("a.test", "CHAIN", "KEY").unwrap();
        let (chain, key) = store.load("a.test").unwrap().unwrap();
        assert_eq!((chain.as_str(), key.as_str()), ("CHAIN", "KEY"));
        let mode = std::fs::metadata(store.cert_dir("a.test").join("key.pem")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(store.load("b.test").unwrap().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_tls_alpn_certificate_carries_the_digest() {
        let cert = challenge_cert("a.test", &[7u8; 32]).unwrap();
        let (_, x509) = x509_parser::parse_x509_certificate(&cert.cert[0]).unwrap();
        let ext = x509.extensions().iter().find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31").unwrap();
        assert!(ext.critical);
        assert!(ext.value.ends_with(&[7u8; 32]));
    }
}
