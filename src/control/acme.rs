//! The ACME task: keeps a certificate for every name an `https://HOST?acme`
//! route serves. A certificate kept in the state directory is served at
//! once; a missing one is ordered (instant-acme), the challenge answered by
//! portmux itself (TLS-ALPN-01 on the route's port, or HTTP-01 on
//! `--acme-http-port`, even where a service holds that port for the name),
//! and renewed before it expires. Failures are retried with jittered
//! backoff; a server that says it is rate limiting is left alone longer.

use super::driver::Control;
use crate::config::{AcmeChallenge, AcmeSettings};
use crate::tls::acme::{self, Store};
use crate::tls::certs::CertSlot;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount, NewOrder, OrderStatus,
    RetryPolicy,
};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, SystemTime};

/// The most one order may take, from the account to the certificate.
const ISSUE_TIMEOUT: Duration = Duration::from_secs(300);

/// What is known about one name.
#[derive(Debug, Default)]
struct Name {
    /// The kept certificate was looked at.
    loaded: bool,
    renew_at: Option<SystemTime>,
    retry_at: Option<SystemTime>,
    failures: u32,
    /// When to fetch the next OCSP staple (`None`: now).
    ocsp_at: Option<SystemTime>,
}

/// Why an order failed.
#[derive(Debug)]
struct Failure {
    reason: String,
    rate_limited: bool,
}

impl From<instant_acme::Error> for Failure {
    fn from(e: instant_acme::Error) -> Failure {
        let rate_limited = matches!(&e, instant_acme::Error::Api(p) if p.r#type.as_deref().is_some_and(|t| t.ends_with(":rateLimited")));
        Failure { reason: e.to_string(), rate_limited }
    }
}

impl From<String> for Failure {
    fn from(reason: String) -> Failure {
        Failure { reason, rate_limited: false }
    }
}

/// Runs for the life of the control plane.
pub(super) async fn run(control: Rc<Control>) {
    let settings = control.shared().settings.acme.clone();
    let store = Store::new(&control.shared().settings.state_dir);
    let wake = control.tls.borrow().acme_wake.clone();
    let mut names: HashMap<String, Name> = HashMap::new();
    let mut account: Option<Account> = None;
    loop {
        let woken = wake.notified();
        let wanted = control.tls.borrow_mut().acme_names();
        names.retain(|host, _| wanted.iter().any(|(h, _)| h == host));
        let mut next: Option<SystemTime> = None;
        for (host, slot) in wanted {
            let name = names.entry(host.clone()).or_default();
            if !name.loaded {
                // The kept certificate, if any, was put in the slot when the route was claimed.
                name.loaded = true;
                name.renew_at = renewal(&slot, settings.renew_before);
            }
            let now = SystemTime::now();
            let due = slot.current().is_none() || name.renew_at.is_some_and(|t| t <= now);
            if due && name.retry_at.is_none_or(|t| t <= now) {
                // Bounded: a stalled ACME server must not hold up the other names.
                let ordered =
                    tokio::time::timeout(ISSUE_TIMEOUT, issue(&control, &settings, &store, &mut account, &host));
                let ordered = ordered.await.unwrap_or_else(|_| {
                    Err(format!("the order took longer than {}", humantime::format_duration(ISSUE_TIMEOUT)).into())
                });
                match ordered {
                    Ok(certified) => {
                        slot.install(certified);
                        name.renew_at = renewal(&slot, settings.renew_before);
                        name.retry_at = None;
                        name.failures = 0;
                        name.ocsp_at = None;
                    }
                    Err(f) => {
                        let wait = acme::backoff(name.failures, f.rate_limited, rand());
                        name.failures += 1;
                        name.retry_at = Some(SystemTime::now() + wait);
                        tracing::warn!(
                            host = %host,
                            retry_in = %humantime::format_duration(Duration::from_secs(wait.as_secs())),
                            "cannot get a certificate from {}: {}",
                            settings.directory,
                            f.reason
                        );
                    }
                }
            }
            if let Some(certified) = slot.current()
                && name.ocsp_at.is_none_or(|t| t <= SystemTime::now())
            {
                name.ocsp_at = Some(staple(&store, &host, &slot, &certified, name.renew_at).await);
            }
            for t in [name.renew_at, name.retry_at, name.ocsp_at].into_iter().flatten() {
                next = Some(next.map_or(t, |n| n.min(t)));
            }
        }
        let sleep = next
            .map(|t| t.duration_since(SystemTime::now()).unwrap_or_default())
            .unwrap_or(Duration::from_secs(3600))
            .min(Duration::from_secs(3600));
        tokio::select! {
            () = tokio::time::sleep(sleep) => {}
            () = woken => {}
        }
    }
}

/// Puts the certificate kept for `host` in its slot, if there is a usable,
/// unexpired one (called when a route claims the name).
pub(super) fn load(store: &Store, host: &str, slot: &CertSlot) {
    match store.load(host) {
        Ok(Some((chain, key))) => match CertSlot::parse(&chain, &key, host) {
            Ok(_) if acme::validity(&chain).is_none_or(|(_, until)| until <= SystemTime::now()) => {
                tracing::info!(host, "the kept ACME certificate has expired; ordering a new one");
            }
            Ok(certified) => {
                slot.install(certified);
                tracing::info!(host, "serving the ACME certificate kept in {}", store.dir().display());
            }
            Err(e) => tracing::warn!(host, "the kept ACME certificate is unusable ({e}); ordering a new one"),
        },
        Ok(None) => {}
        Err(e) => tracing::warn!(host, "cannot read the kept ACME certificate: {e}"),
    }
}

/// When the certificate in `slot` is due for renewal (`None`: there is none).
fn renewal(slot: &CertSlot, renew_before: Duration) -> Option<SystemTime> {
    let (from, until) = acme::validity_der(slot.current()?.cert.first()?)?;
    Some(acme::renew_at(from, until, renew_before))
}

/// Fetches and staples an OCSP response for `host`'s certificate when it
/// names a responder (one kept from before is used while still fresh):
/// when to look again.
async fn staple(
    store: &Store,
    host: &str,
    slot: &CertSlot,
    certified: &rustls::sign::CertifiedKey,
    renew_at: Option<SystemTime>,
) -> SystemTime {
    let later = || SystemTime::now() + Duration::from_secs(3600);
    let query = match crate::tls::ocsp::query(&certified.cert) {
        Ok(Some(q)) => q,
        // No responder named (Let's Encrypt's certificates since 2025): until the next certificate.
        Ok(None) => return renew_at.unwrap_or_else(later),
        Err(e) => {
            tracing::warn!(host, "cannot make an OCSP request for the certificate: {e}");
            return later();
        }
    };
    let install = |der: Vec<u8>| {
        let mut stapled = certified.clone();
        stapled.ocsp = Some(der);
        slot.install(stapled);
    };
    if let Some(kept) = store.load_ocsp(host)
        && let Ok(next) = crate::tls::ocsp::check(&query, &kept)
        && next > SystemTime::now() + Duration::from_secs(3600)
    {
        install(kept);
        return next;
    }
    let fetched = crate::tls::ocsp::fetch(&query, Duration::from_secs(20)).await;
    match fetched.and_then(|der| crate::tls::ocsp::check(&query, &der).map(|next| (der, next))) {
        Ok((der, next)) => {
            if let Err(e) = store.save_ocsp(host, &der) {
                tracing::warn!(host, "cannot keep the OCSP response: {e}");
            }
            install(der);
            tracing::info!(host, responder = %query.url, "OCSP response stapled");
            next
        }
        Err(e) => {
            tracing::warn!(host, responder = %query.url, "no OCSP staple: {e}; trying again in an hour");
            later()
        }
    }
}

fn rand() -> u32 {
    let mut b = [0u8; 4];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    u32::from_ne_bytes(b)
}

/// The ACME account: the one kept for this directory, or a new one (kept).
async fn account(settings: &AcmeSettings, store: &Store) -> Result<Account, Failure> {
    let builder = || match &settings.ca {
        Some(ca) => Account::builder_with_root(ca),
        None => Account::builder(),
    };
    let path = store.account_path(&settings.directory);
    if let Ok(text) = std::fs::read_to_string(&path) {
        match serde_json::from_str::<AccountCredentials>(&text) {
            Ok(credentials) => return Ok(builder()?.from_credentials(credentials).await?),
            Err(e) => {
                tracing::warn!(path = %path.display(), "the kept ACME account is unreadable ({e}); making a new one")
            }
        }
    }
    let contact = settings.email.iter().map(|e| format!("mailto:{e}")).collect::<Vec<_>>();
    let contact: Vec<&str> = contact.iter().map(String::as_str).collect();
    let new = NewAccount { contact: &contact, terms_of_service_agreed: true, only_return_existing: false };
    let (account, credentials) = builder()?.create(&new, settings.directory.clone(), None).await?;
    let json = serde_json::to_string(&credentials).map_err(|e| e.to_string())?;
    acme::create_private_dir(store.dir())
        .and_then(|()| acme::write_private(&path, json.as_bytes()))
        .map_err(|e| format!("cannot keep the ACME account in {} ({e}); is --state-dir writable?", path.display()))?;
    tracing::info!(directory = %settings.directory, id = account.id(), "ACME account created");
    Ok(account)
}

/// Undoes what a challenge set up, however the order ends.
struct Cleanup<'a> {
    challenges: &'a acme::Challenges,
    http: Vec<String>,
    alpn: Vec<String>,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        for t in &self.http {
            self.challenges.remove_http(t);
        }
        for h in &self.alpn {
            self.challenges.remove_tls_alpn(h);
        }
    }
}

/// Orders a certificate for `host` and keeps it: the certificate to serve.
async fn issue(
    control: &Rc<Control>,
    settings: &AcmeSettings,
    store: &Store,
    account_slot: &mut Option<Account>,
    host: &str,
) -> Result<rustls::sign::CertifiedKey, Failure> {
    if account_slot.is_none() {
        *account_slot = Some(account(settings, store).await?);
    }
    let Some(account) = account_slot.as_ref() else { return Err("no ACME account".to_string().into()) };
    tracing::info!(host, directory = %settings.directory, "ordering a certificate");
    let identifiers = [Identifier::Dns(host.to_string())];
    let mut order = account.new_order(&NewOrder::new(&identifiers)).await?;
    let challenges = control.shared().tls.challenges.clone();
    let mut cleanup = Cleanup { challenges: &challenges, http: Vec::new(), alpn: Vec::new() };
    let mut authorizations = order.authorizations();
    while let Some(authz) = authorizations.next().await {
        let mut authz = authz?;
        match authz.status {
            AuthorizationStatus::Pending => {}
            AuthorizationStatus::Valid => continue,
            other => return Err(format!("the authorization for {host} is {other:?}").into()),
        }
        let type_of = |kind: &AcmeChallenge| match kind {
            AcmeChallenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
            AcmeChallenge::Http01 => ChallengeType::Http01,
        };
        let offered = |kind: &AcmeChallenge| authz.challenges.iter().any(|c| c.r#type == type_of(kind));
        let mut chosen = None;
        for kind in settings.challenges.iter().filter(|k| offered(k)) {
            if *kind == AcmeChallenge::Http01
                && let Err(e) = http_route(control, settings.http_port)
            {
                tracing::warn!(host, "HTTP-01 needs port {}: {e}; trying the next challenge", settings.http_port);
                continue;
            }
            chosen = Some(*kind);
            break;
        }
        let Some(kind) = chosen else {
            let why =
                format!("the ACME server offers none of the challenges portmux answers ({:?})", settings.challenges);
            return Err(why.into());
        };
        let Some(mut challenge) = authz.challenge(type_of(&kind)) else { continue };
        let key_authorization = challenge.key_authorization();
        match kind {
            AcmeChallenge::TlsAlpn01 => {
                let cert = acme::challenge_cert(host, key_authorization.digest().as_ref())?;
                challenges.set_tls_alpn(host, cert);
                cleanup.alpn.push(host.to_string());
            }
            AcmeChallenge::Http01 => {
                challenges.set_http(&challenge.token, key_authorization.as_str());
                cleanup.http.push(challenge.token.clone());
            }
        }
        tracing::debug!(host, challenge = ?kind, "challenge ready");
        challenge.set_ready().await?;
    }
    let retries = RetryPolicy::default().timeout(Duration::from_secs(120));
    let status = order.poll_ready(&retries).await?;
    if status != OrderStatus::Ready {
        return Err(format!("the order is {status:?} (the challenge failed validation)").into());
    }
    let key = zeroize::Zeroizing::new(order.finalize().await?);
    let chain = order.poll_certificate(&retries).await?;
    drop(cleanup);
    let certified =
        CertSlot::parse(&chain, &key, host).map_err(|e| format!("the issued certificate is unusable: {e}"))?;
    let (_, until) =
        acme::validity(&chain).ok_or_else(|| "the issued certificate has no readable validity".to_string())?;
    store.save(host, &chain, &key).map_err(|e| {
        format!("cannot keep the certificate in {} ({e}); is --state-dir writable?", store.dir().display())
    })?;
    tracing::info!(host, until = %humantime::format_rfc3339_seconds(until), "certificate issued");
    Ok(certified)
}

/// Makes sure portmux listens for HTTP-01 on `port` (a route of its own,
/// `http://:PORT/.well-known/acme-challenge?acme`; challenges for names a
/// service holds on that port are answered before routing).
fn http_route(control: &Rc<Control>, port: u16) -> Result<(), String> {
    let text = format!("http://:{port}/.well-known/acme-challenge?acme");
    let spec = portmux_wire::RouteSpec::parse(&text).map_err(|e| e.to_string())?;
    let key = crate::route::route_key(&spec, control.shared().settings.bind);
    if control.core.borrow().routes().contains_key(&key) {
        return Ok(());
    }
    control.set_backends(spec, Vec::new()).map(|_| ()).map_err(|e| e.to_string())
}
