//! Certificates for terminated TLS: loaded from PEM files (and reloaded when
//! they change on disk) or sent by a service with its registration, each kept
//! in a slot that handshakes read without locks.

use arc_swap::ArcSwapOption;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use zeroize::Zeroizing;

/// A certificate that could not be used; the message names the file and the reason.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{what}: {reason}")]
    Invalid { what: String, reason: String },
}

impl CertError {
    fn invalid(what: impl Into<String>, reason: impl Into<String>) -> CertError {
        CertError::Invalid { what: what.into(), reason: reason.into() }
    }
}

/// Where a slot's certificate comes from.
#[derive(Debug)]
enum Source {
    Files {
        cert: PathBuf,
        key: PathBuf,
        seen: Mutex<Stamp>,
    },
    /// A service's registration: kept (zeroed when dropped) for an upgrade's handover.
    Service {
        chain: Zeroizing<String>,
        key: Zeroizing<String>,
    },
    /// ACME, for this name: empty until the first certificate is issued.
    Acme {
        host: String,
    },
}

/// A certificate chain with its key, replaced whole when its files change.
#[derive(Debug)]
pub struct CertSlot {
    current: ArcSwapOption<CertifiedKey>,
    source: Source,
}

impl CertSlot {
    /// What handshakes use now; `None` until ACME has issued one.
    pub fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }

    /// An empty slot for a name whose certificate ACME will issue.
    pub fn acme(host: &str) -> Arc<CertSlot> {
        Arc::new(CertSlot { current: ArcSwapOption::empty(), source: Source::Acme { host: host.into() } })
    }

    /// Serves `certified` from now on.
    pub fn install(&self, certified: CertifiedKey) {
        self.current.store(Some(Arc::new(certified)));
    }

    /// Parses a PEM chain and key (what ACME issued) into what rustls serves.
    pub fn parse(chain: &str, key: &str, name: &str) -> Result<CertifiedKey, CertError> {
        certified(chain.as_bytes(), name, key.as_bytes(), name, None)
    }

    /// A certificate a service sent (PEM chain, leaf first, and PEM key).
    pub fn from_service(chain: Zeroizing<String>, key: Zeroizing<String>) -> Result<Arc<CertSlot>, CertError> {
        let certified =
            certified(chain.as_bytes(), "the certificate chain sent", key.as_bytes(), "the key sent", None)?;
        let current = ArcSwapOption::from_pointee(certified);
        Ok(Arc::new(CertSlot { current, source: Source::Service { chain, key } }))
    }

    /// The PEM a service sent, for an upgrade's handover.
    pub fn service_pem(&self) -> Option<(&str, &str)> {
        match &self.source {
            Source::Service { chain, key } => Some((chain.as_str(), key.as_str())),
            Source::Files { .. } | Source::Acme { .. } => None,
        }
    }

    /// Whether ACME issues this one.
    pub fn is_acme(&self) -> bool {
        matches!(self.source, Source::Acme { .. })
    }

    /// The files, for messages.
    pub fn describe(&self) -> String {
        match &self.source {
            Source::Files { cert, .. } => cert.display().to_string(),
            Source::Service { .. } => "sent by the service".into(),
            Source::Acme { host } => format!("from ACME for {host}"),
        }
    }

    fn load_files(cert: &Path, key: &Path) -> Result<(CertifiedKey, Stamp), CertError> {
        let read = |path: &Path| std::fs::read(path).map_err(|source| CertError::Read { path: path.into(), source });
        let stamp = Stamp::of(cert, key);
        let chain = read(cert)?;
        let key_pem = Zeroizing::new(read(key)?);
        let ocsp_path = ocsp_path(cert);
        let ocsp = match std::fs::read(&ocsp_path) {
            Ok(der) if !der.is_empty() => Some(der),
            Ok(_) => None,
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(source) => return Err(CertError::Read { path: ocsp_path, source }),
        };
        let certified = certified(&chain, &cert.display().to_string(), &key_pem, &key.display().to_string(), ocsp)?;
        Ok((certified, stamp))
    }
}

/// The OCSP response stapled with `cert`: the file beside it, `CERT.ocsp` (DER).
fn ocsp_path(cert: &Path) -> PathBuf {
    let mut p = cert.as_os_str().to_owned();
    p.push(".ocsp");
    PathBuf::from(p)
}

/// Parses a PEM chain and key into what rustls serves, checking they match.
fn certified(
    chain: &[u8],
    chain_name: &str,
    key: &[u8],
    key_name: &str,
    ocsp: Option<Vec<u8>>,
) -> Result<CertifiedKey, CertError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain)
        .collect::<Result<_, _>>()
        .map_err(|e| CertError::invalid(chain_name, format!("not a PEM certificate chain ({e})")))?;
    if certs.is_empty() {
        return Err(CertError::invalid(chain_name, "no CERTIFICATE block in it"));
    }
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| {
        CertError::invalid(key_name, format!("no PEM private key in it (PKCS#8, PKCS#1 or SEC1 expected; {e})"))
    })?;
    let provider = rustls::crypto::ring::default_provider();
    let mut certified = CertifiedKey::from_der(certs, key, &provider).map_err(|e| {
        let reason = match e {
            rustls::Error::InconsistentKeys(_) => "it is not the key of the certificate's public key".to_string(),
            other => format!("unusable key: {other}"),
        };
        CertError::invalid(key_name, reason)
    })?;
    certified.ocsp = ocsp;
    Ok(certified)
}

/// What a file looked like when it was last read: a change means a reload.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Stamp(Vec<Option<FileId>>);

/// Modification time (s, ns), size, inode and device.
type FileId = (i64, i64, u64, u64, u64);

impl Stamp {
    fn of(cert: &Path, key: &Path) -> Stamp {
        let one = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.mtime(), m.mtime_nsec(), m.size(), m.ino(), m.dev()));
        Stamp(vec![one(cert), one(key), one(&ocsp_path(cert))])
    }
}

/// The certificate files in use, each loaded once however many routes use
/// it; [`FileCerts::refresh`] reloads the ones that changed.
#[derive(Debug, Default)]
pub struct FileCerts {
    slots: HashMap<(PathBuf, PathBuf), Weak<CertSlot>>,
}

impl FileCerts {
    /// The slot for these files, loading them unless a route uses them already.
    pub fn get(&mut self, cert: &Path, key: &Path) -> Result<Arc<CertSlot>, CertError> {
        let id = (cert.to_path_buf(), key.to_path_buf());
        if let Some(slot) = self.slots.get(&id).and_then(Weak::upgrade) {
            return Ok(slot);
        }
        let (certified, stamp) = CertSlot::load_files(cert, key)?;
        let slot = Arc::new(CertSlot {
            current: ArcSwapOption::from_pointee(certified),
            source: Source::Files { cert: id.0.clone(), key: id.1.clone(), seen: Mutex::new(stamp) },
        });
        self.slots.insert(id, Arc::downgrade(&slot));
        Ok(slot)
    }

    /// Reloads the files that changed since they were read. A file that no
    /// longer loads is reported and the certificate in use stays.
    pub fn refresh(&mut self) {
        self.slots.retain(|_, slot| slot.strong_count() > 0);
        for slot in self.slots.values().filter_map(Weak::upgrade) {
            let Source::Files { cert, key, seen } = &slot.source else { continue };
            let now = Stamp::of(cert, key);
            let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
            if *seen == now {
                continue;
            }
            *seen = now;
            match CertSlot::load_files(cert, key) {
                Ok((certified, stamp)) => {
                    *seen = stamp;
                    slot.current.store(Some(Arc::new(certified)));
                    tracing::info!(cert = %cert.display(), "certificate reloaded");
                }
                Err(e) => {
                    tracing::warn!(cert = %cert.display(), "the changed certificate is refused, the previous one stays in use: {e}")
                }
            }
        }
    }
}
