//! OCSP staples for certificates portmux gets from ACME: the request for a
//! certificate (RFC 6960, with x509-ocsp) to the responder its Authority
//! Information Access names, the POST (RFC 6960 appendix A), and the check
//! of what came back (a successful response about this certificate, and
//! when to fetch the next one).

use der::{Decode, Encode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use std::time::{Duration, SystemTime};
use x509_cert::Certificate;
use x509_ocsp::builder::OcspRequestBuilder;
use x509_ocsp::{BasicOcspResponse, CertStatus, OcspResponse, OcspResponseStatus, Request};

/// What to ask, and where.
#[derive(Debug, Clone)]
pub struct Query {
    /// The responder's URL (http).
    pub url: String,
    /// The DER-encoded OCSPRequest.
    pub request: Vec<u8>,
    /// The issuer's certificate (DER), which signs the response or its responder's.
    pub issuer: Vec<u8>,
}

/// The query for the leaf of `chain` (DER, leaf then issuer), if the leaf
/// names an OCSP responder.
pub fn query(chain: &[rustls::pki_types::CertificateDer<'_>]) -> Result<Option<Query>, String> {
    let (Some(leaf), Some(issuer)) = (chain.first(), chain.get(1)) else {
        return Ok(None); // No issuer in the chain: nothing to ask about.
    };
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf).map_err(|e| e.to_string())?;
    let url = parsed.extensions().iter().find_map(|ext| match ext.parsed_extension() {
        x509_parser::extensions::ParsedExtension::AuthorityInfoAccess(aia) => aia
            .accessdescs
            .iter()
            .filter(|d| d.access_method == x509_parser::oid_registry::OID_PKIX_ACCESS_DESCRIPTOR_OCSP)
            .find_map(|d| match &d.access_location {
                x509_parser::extensions::GeneralName::URI(u) if u.starts_with("http://") => Some(u.to_string()),
                _ => None,
            }),
        _ => None,
    });
    let Some(url) = url else { return Ok(None) };
    let issuer_der = issuer.to_vec();
    let leaf = Certificate::from_der(leaf).map_err(|e| e.to_string())?;
    let issuer = Certificate::from_der(issuer).map_err(|e| e.to_string())?;
    let request = Request::from_cert::<sha1::Sha1>(&issuer, &leaf).map_err(|e| e.to_string())?;
    let request = OcspRequestBuilder::default().with_request(request).build().to_der().map_err(|e| e.to_string())?;
    Ok(Some(Query { url, request, issuer: issuer_der }))
}

/// Checks a response to `query`: a successful one, signed by the issuer (or
/// by a responder certificate the issuer signed for OCSP signing), about the
/// certificate asked for (the same CertID), whose status is good (a revoked
/// or unknown one is not stapled); when to fetch the next (halfway to its
/// nextUpdate, at least an hour from now, at most a day without one).
pub fn check(query: &Query, response: &[u8]) -> Result<SystemTime, String> {
    let r = OcspResponse::from_der(response).map_err(|e| format!("not an OCSP response: {e}"))?;
    if r.response_status != OcspResponseStatus::Successful {
        return Err(format!("the responder answered {:?}", r.response_status));
    }
    let bytes = r.response_bytes.ok_or("a successful response without a body")?;
    let basic =
        BasicOcspResponse::from_der(bytes.response.as_bytes()).map_err(|e| format!("bad basic response: {e}"))?;
    verify(&basic, &query.issuer)?;
    let asked = x509_ocsp::OcspRequest::from_der(&query.request).map_err(|e| e.to_string())?;
    let id = &asked.tbs_request.request_list.first().ok_or("an empty request")?.req_cert;
    let single = basic
        .tbs_response_data
        .responses
        .iter()
        .find(|s| {
            // The hashes and the serial (responders differ on the hash algorithm's NULL parameters).
            let c = &s.cert_id;
            (c.issuer_name_hash == id.issuer_name_hash)
                && (c.issuer_key_hash == id.issuer_key_hash)
                && (c.serial_number == id.serial_number)
        })
        .ok_or("the response is about another certificate")?;
    match single.cert_status {
        CertStatus::Good(_) => {}
        CertStatus::Revoked(_) => return Err("the certificate is revoked".into()),
        CertStatus::Unknown(_) => return Err("the responder does not know the certificate".into()),
    }
    let now = SystemTime::now();
    let this = single.this_update.0.to_system_time();
    let refresh = match &single.next_update {
        Some(next) => {
            let next = next.0.to_system_time();
            if next <= now {
                return Err("the response has expired".into());
            }
            this + next.duration_since(this).unwrap_or_default() / 2
        }
        None => now + Duration::from_secs(86_400),
    };
    Ok(refresh.max(now + Duration::from_secs(3600)))
}

/// Checks the response's signature: by the issuer's key, or by the first
/// certificate it carries when the issuer signed that one and allowed it to
/// sign OCSP responses (RFC 6960 4.2.2.2).
fn verify(basic: &BasicOcspResponse, issuer_der: &[u8]) -> Result<(), String> {
    use x509_parser::asn1_rs::{BitString, FromDer};
    let bad = |e: &dyn std::fmt::Display| format!("the response's signature cannot be checked: {e}");
    let (_, issuer) = x509_parser::parse_x509_certificate(issuer_der).map_err(|e| bad(&e))?;
    let delegated =
        basic.certs.as_ref().and_then(|c| c.first()).map(|c| c.to_der()).transpose().map_err(|e| bad(&e))?;
    let responder = match &delegated {
        Some(der) => {
            let (_, cert) = x509_parser::parse_x509_certificate(der).map_err(|e| bad(&e))?;
            Some(cert)
        }
        None => None,
    };
    let signer = match &responder {
        Some(r) if r.public_key().raw != issuer.public_key().raw => {
            r.verify_signature(Some(issuer.public_key()))
                .map_err(|_| "the responder's certificate is not signed by the issuer".to_string())?;
            let eku = r.extended_key_usage().ok().flatten();
            if !eku.is_some_and(|e| e.value.ocsp_signing) {
                return Err("the responder's certificate may not sign OCSP responses".into());
            }
            r.public_key()
        }
        _ => issuer.public_key(),
    };
    let tbs = basic.tbs_response_data.to_der().map_err(|e| bad(&e))?;
    let alg_der = basic.signature_algorithm.to_der().map_err(|e| bad(&e))?;
    let (_, alg) = x509_parser::x509::AlgorithmIdentifier::from_der(&alg_der).map_err(|e| bad(&e))?;
    let sig_der = basic.signature.to_der().map_err(|e| bad(&e))?;
    let (_, sig) = BitString::from_der(&sig_der).map_err(|e| bad(&e))?;
    x509_parser::verify::verify_signature(signer, &alg, &sig, &tbs)
        .map_err(|_| "the response's signature does not verify (not signed by the issuer)".to_string())
}

/// POSTs the request to the responder (plain HTTP, as OCSP is) within `within`.
pub async fn fetch(query: &Query, within: Duration) -> Result<Vec<u8>, String> {
    let uri: hyper::Uri = query.url.parse().map_err(|e| format!("bad OCSP URL {}: {e}", query.url))?;
    let host = uri.host().ok_or("an OCSP URL without a host")?.to_string();
    let port = uri.port_u16().unwrap_or(80);
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let body = Bytes::from(query.request.clone());
    let exchange = async move {
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await.map_err(|e| e.to_string())?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
        let driving = AbortOnDrop(tokio::spawn(conn));
        let request = hyper::Request::post(path)
            .header(hyper::header::HOST, &host)
            .header(hyper::header::CONTENT_TYPE, "application/ocsp-request")
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        let response = sender.send_request(request).await.map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("the responder answered HTTP {}", response.status()));
        }
        let body = Limited::new(response.into_body(), 64 * 1024).collect().await.map_err(|e| e.to_string())?;
        drop(driving);
        Ok(body.to_bytes().to_vec())
    };
    tokio::time::timeout(within, exchange).await.map_err(|_| "the OCSP responder did not answer in time".to_string())?
}

/// Ends the task driving the responder's connection, however the exchange ends.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
