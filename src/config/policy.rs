//! Who may claim what. Every control and admin connection is identified by
//! the kernel (`SO_PEERCRED`: pid, uid, gid; the groups and the systemd unit
//! from `/proc`), never by what it says. Root and the uid portmux runs as may
//! claim anything; everyone else is held to the policy's rules (the config
//! file's `[[policy.rule]]`s, or the built-in default: unprivileged ports
//! only) and never gets what another uid holds (checked by the control
//! plane's core, which knows the holders).

use portmux_wire::spec::{HostPattern, RouteSpec, Scheme};
use serde::Deserialize;
use std::fmt;

/// Who is on the other end of a control or admin connection, as the kernel says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (from `/proc/PID/status`; empty if it could not be read).
    pub groups: Vec<u32>,
    /// The systemd unit the process runs in (from its cgroup), if any.
    pub unit: Option<String>,
}

impl Peer {
    /// A peer from what is known of it, the rest read from `/proc/PID` (a
    /// process already gone has no groups, unit or, unless given, gid).
    fn read(pid: i32, uid: u32, gid: Option<u32>, groups: Option<Vec<u32>>) -> Peer {
        let status = match (gid, &groups) {
            (Some(_), Some(_)) => String::new(),
            _ => std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default(),
        };
        let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).unwrap_or_default();
        let gid = gid.unwrap_or_else(|| {
            field("Gid:").split_whitespace().next().and_then(|g| g.parse().ok()).unwrap_or(u32::MAX)
        });
        let groups =
            groups.unwrap_or_else(|| field("Groups:").split_whitespace().filter_map(|n| n.parse().ok()).collect());
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        Peer { pid, uid, gid, groups, unit: unit_of(&cgroup) }
    }

    /// A peer on a connected Unix socket: its groups as the kernel recorded
    /// them when it connected (`SO_PEERGROUPS`); its unit from `/proc`, kept
    /// only if its pidfd shows the process still alive after the read (so the
    /// pid was not reused by another process meanwhile). Kernels without
    /// `SO_PEERPIDFD` (before 6.5) get the `/proc` reading as it is.
    pub fn from_socket(fd: std::os::fd::BorrowedFd<'_>, pid: i32, uid: u32, gid: u32) -> Peer {
        use portmux_sys::net;
        let mut peer = Peer::read(pid, uid, Some(gid), net::peer_groups(fd).ok());
        if let Ok(pidfd) = net::peer_pidfd(fd)
            && !net::pidfd_alive(std::os::fd::AsFd::as_fd(&pidfd))
        {
            peer.unit = None;
        }
        peer
    }

    /// A peer known by pid and uid (a session handed over by an upgrade): its
    /// gid, groups and unit are read from `/proc`.
    pub fn from_pid(pid: i32, uid: u32) -> Peer {
        Peer::read(pid, uid, None, None)
    }

    /// A peer known only by pid and uid (in tests).
    #[cfg(test)]
    pub fn known(pid: i32, uid: u32) -> Peer {
        Peer { pid, uid, gid: u32::MAX, groups: Vec::new(), unit: None }
    }

    fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups.contains(&gid)
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "uid {} (pid {}", self.uid, self.pid)?;
        if let Some(u) = &self.unit {
            write!(f, ", unit {u}")?;
        }
        f.write_str(")")
    }
}

/// The systemd system unit of a process, from its `/proc/PID/cgroup`: the
/// innermost `.service` in its cgroup v2 path. Units of a user's own service
/// manager (under `user@UID.service`) are not taken: any user can name one
/// of those as it likes.
pub fn unit_of(cgroup: &str) -> Option<String> {
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    if path.split('/').any(|c| c.starts_with("user@")) {
        return None;
    }
    path.rsplit('/').find(|c| c.ends_with(".service") && c.len() > ".service".len()).map(str::to_string)
}

/// A refusal by the policy: the rule that refused and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Which rule decided, as a user can find it ("the default policy", "policy rule 2 (uid 1001)").
    pub rule: String,
    pub reason: String,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "refused by {}: {}", self.rule, self.reason)
    }
}

/// The rules, in the order they are tried.
#[derive(Debug, Clone)]
pub struct Policy {
    rules: Vec<Rule>,
    /// The uid portmux runs as (its services and operators are trusted like root's).
    own_uid: u32,
}

/// One rule: whom it is for, and what they may claim.
#[derive(Debug, Clone)]
pub struct Rule {
    /// How the rule is named in refusals.
    name: String,
    uids: Vec<u32>,
    gids: Vec<u32>,
    units: Vec<String>,
    ports: Vec<(u16, u16)>,
    hosts: Vec<HostRule>,
    services: Vec<String>,
    /// May change routes through the admin API.
    admin: bool,
}

/// A host a rule allows: any, one name, or every name under a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
enum HostRule {
    Any,
    Exact(String),
    /// `*.SUFFIX`: names under SUFFIX, and `*.`-routes at or under it.
    Suffix(String),
}

impl Policy {
    /// The built-in policy: other users claim unprivileged ports only, any
    /// host and any service name that nobody else holds.
    pub fn builtin(own_uid: u32) -> Policy {
        Policy { rules: Vec::new(), own_uid }
    }

    fn default_rule() -> Rule {
        Rule {
            name: "the default policy".into(),
            uids: Vec::new(),
            gids: Vec::new(),
            units: Vec::new(),
            ports: vec![(1024, u16::MAX)],
            hosts: vec![HostRule::Any],
            services: vec!["*".into()],
            admin: false,
        }
    }

    /// The uid portmux runs as (after `--user`).
    pub fn own_uid(&self) -> u32 {
        self.own_uid
    }

    /// Whether `peer` is trusted like the administrator (root, or portmux's own uid).
    pub fn privileged(&self, peer: &Peer) -> bool {
        peer.uid == 0 || peer.uid == self.own_uid
    }

    /// The rule that applies to `peer` (not privileged), or why none does.
    fn rule_for(&self, peer: &Peer) -> Result<std::borrow::Cow<'_, Rule>, Refusal> {
        if self.rules.is_empty() {
            return Ok(std::borrow::Cow::Owned(Policy::default_rule()));
        }
        self.rules.iter().find(|r| r.applies_to(peer)).map(std::borrow::Cow::Borrowed).ok_or_else(|| Refusal {
            rule: "the policy".into(),
            reason: format!(
                "no [[policy.rule]] applies to {peer}; ask the administrator for a rule naming this uid, group or unit"
            ),
        })
    }

    /// Whether `peer` may claim `spec` for service `service` (what others hold is checked elsewhere).
    pub fn may_claim(&self, peer: &Peer, spec: &RouteSpec, service: &str) -> Result<(), Refusal> {
        if self.privileged(peer) {
            return Ok(());
        }
        let rule = self.rule_for(peer)?;
        let refuse = |reason: String| Err(Refusal { rule: rule.name.clone(), reason });
        if !rule.ports.iter().any(|(lo, hi)| (*lo..=*hi).contains(&spec.port)) {
            let allowed: Vec<String> = rule
                .ports
                .iter()
                .map(|(lo, hi)| if lo == hi { lo.to_string() } else { format!("{lo}-{hi}") })
                .collect();
            let why = if spec.port < 1024 { " (a privileged port)" } else { "" };
            return refuse(format!(
                "{peer} may claim ports {}, not {}{why}",
                if allowed.is_empty() { "none".into() } else { allowed.join(", ") },
                spec.port
            ));
        }
        let host = if spec.scheme == Scheme::Tcp { &HostPattern::Any } else { &spec.host };
        if !rule.hosts.iter().any(|h| h.allows(host)) {
            let what = match host {
                HostPattern::Any if spec.scheme == Scheme::Tcp => "a whole port (tcp://)".to_string(),
                HostPattern::Any => "any host".to_string(),
                HostPattern::Exact(h) => format!("host {h}"),
                HostPattern::Suffix(s) => format!("hosts *.{s}"),
            };
            let allowed: Vec<String> = rule.hosts.iter().map(ToString::to_string).collect();
            return refuse(format!("{peer} may claim hosts {}, not {what}", allowed.join(", ")));
        }
        if !rule.services.iter().any(|p| glob(p, service)) {
            return refuse(format!("{peer} may use service names {}, not '{service}'", rule.services.join(", ")));
        }
        Ok(())
    }

    /// Whether `peer` may change routes through the admin API.
    pub fn may_administer(&self, peer: &Peer) -> Result<(), Refusal> {
        if self.privileged(peer) {
            return Ok(());
        }
        let rule = self.rule_for(peer)?;
        if rule.admin {
            Ok(())
        } else {
            Err(Refusal {
                rule: rule.name.clone(),
                reason: format!(
                    "{peer} may not change routes through the admin API (only root, uid {}, and rules with admin = true)",
                    self.own_uid
                ),
            })
        }
    }
}

impl Rule {
    fn applies_to(&self, peer: &Peer) -> bool {
        (self.uids.is_empty() || self.uids.contains(&peer.uid))
            && (self.gids.is_empty() || self.gids.iter().any(|g| peer.in_group(*g)))
            && (self.units.is_empty() || peer.unit.as_ref().is_some_and(|u| self.units.contains(u)))
    }
}

impl HostRule {
    fn parse(text: &str) -> Result<HostRule, String> {
        if text == "*" {
            return Ok(HostRule::Any);
        }
        let (suffix, name) = match text.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let name = portmux_wire::spec::normalize_name(name)
            .filter(|n| !n.contains('*'))
            .ok_or_else(|| format!("'{text}' is not a host; write a name, *.domain, or * for any"))?;
        Ok(if suffix { HostRule::Suffix(name) } else { HostRule::Exact(name) })
    }

    fn allows(&self, host: &HostPattern) -> bool {
        let under = |name: &str, domain: &str| name.strip_suffix(domain).is_some_and(|rest| rest.ends_with('.'));
        match (self, host) {
            (HostRule::Any, _) => true,
            (_, HostPattern::Any) => false,
            (HostRule::Exact(a), HostPattern::Exact(h)) => a == h,
            (HostRule::Exact(_), HostPattern::Suffix(_)) => false,
            (HostRule::Suffix(s), HostPattern::Exact(h)) => under(h, s),
            (HostRule::Suffix(s), HostPattern::Suffix(t)) => t == s || under(t, s),
        }
    }
}

impl fmt::Display for HostRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostRule::Any => f.write_str("*"),
            HostRule::Exact(h) => f.write_str(h),
            HostRule::Suffix(s) => write!(f, "*.{s}"),
        }
    }
}

/// `*` matches anything, `PREFIX*` names that start with PREFIX, anything else itself.
fn glob(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

/// One value or a list of them, as TOML users write either.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    fn into_vec(self) -> Vec<T> {
        match self {
            OneOrMany::One(t) => vec![t],
            OneOrMany::Many(v) => v,
        }
    }
}

/// A port or a range `"LOW-HIGH"`, as written in the file.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PortEntry {
    Port(u16),
    Range(String),
}

/// The `[policy]` section of the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySection {
    #[serde(default)]
    rule: Vec<RuleEntry>,
}

/// A `[[policy.rule]]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleEntry {
    uid: Option<OneOrMany<u32>>,
    user: Option<OneOrMany<String>>,
    gid: Option<OneOrMany<u32>>,
    group: Option<OneOrMany<String>>,
    unit: Option<OneOrMany<String>>,
    ports: Option<Vec<PortEntry>>,
    hosts: Option<Vec<String>>,
    services: Option<Vec<String>>,
    #[serde(default)]
    admin: bool,
}

/// The numeric fields 3 and 4 of `name`'s line in `/etc/passwd` or
/// `/etc/group` (a user's uid and gid; a group's gid).
fn lookup(file: &str, name: &str) -> Option<(u32, Option<u32>)> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 2 && f[0] == name).then(|| Some((f[2].parse().ok()?, f.get(3).and_then(|g| g.parse().ok()))))?
    })
}

/// A user's uid and primary gid, from `/etc/passwd`.
pub fn user_ids(name: &str) -> Option<(u32, u32)> {
    lookup("/etc/passwd", name).and_then(|(uid, gid)| Some((uid, gid?)))
}

/// A group's gid, from `/etc/group`.
fn group_id(name: &str) -> Option<u32> {
    lookup("/etc/group", name).map(|(gid, _)| gid)
}

impl PolicySection {
    /// The policy these rules make (names of users and groups are looked up now).
    pub fn build(self, own_uid: u32) -> Result<Policy, String> {
        let mut rules = Vec::new();
        for (i, r) in self.rule.into_iter().enumerate() {
            let n = i + 1;
            let mut uids: Vec<u32> = r.uid.map(OneOrMany::into_vec).unwrap_or_default();
            for user in r.user.map(OneOrMany::into_vec).unwrap_or_default() {
                uids.push(
                    user_ids(&user)
                        .map(|(uid, _)| uid)
                        .ok_or_else(|| format!("policy rule {n}: no user '{user}' in /etc/passwd; use uid = N"))?,
                );
            }
            let mut gids: Vec<u32> = r.gid.map(OneOrMany::into_vec).unwrap_or_default();
            for group in r.group.map(OneOrMany::into_vec).unwrap_or_default() {
                gids.push(
                    group_id(&group)
                        .ok_or_else(|| format!("policy rule {n}: no group '{group}' in /etc/group; use gid = N"))?,
                );
            }
            let units = r.unit.map(OneOrMany::into_vec).unwrap_or_default();
            let mut ports = Vec::new();
            for p in r.ports.unwrap_or_else(|| vec![PortEntry::Range("1024-65535".into())]) {
                ports.push(match p {
                    PortEntry::Port(0) => return Err(format!("policy rule {n}: port 0 is not a port")),
                    PortEntry::Port(p) => (p, p),
                    PortEntry::Range(text) => {
                        let bad = || format!("policy rule {n}: '{text}' is not a port or a range like \"8000-8099\"");
                        let (lo, hi) = text.split_once('-').ok_or_else(bad)?;
                        let (lo, hi): (u16, u16) =
                            (lo.trim().parse().map_err(|_| bad())?, hi.trim().parse().map_err(|_| bad())?);
                        if lo == 0 || lo > hi {
                            return Err(bad());
                        }
                        (lo, hi)
                    }
                });
            }
            let hosts = r
                .hosts
                .unwrap_or_else(|| vec!["*".into()])
                .iter()
                .map(|h| HostRule::parse(h).map_err(|e| format!("policy rule {n}: {e}")))
                .collect::<Result<_, _>>()?;
            let services = r.services.unwrap_or_else(|| vec!["*".into()]);
            let mut who: Vec<String> = uids.iter().map(|u| format!("uid {u}")).collect();
            who.extend(gids.iter().map(|g| format!("gid {g}")));
            who.extend(units.iter().cloned());
            let name = if who.is_empty() {
                format!("policy rule {n} (everyone)")
            } else {
                format!("policy rule {n} ({})", who.join(", "))
            };
            rules.push(Rule { name, uids, gids, units, ports, hosts, services, admin: r.admin });
        }
        Ok(Policy { rules, own_uid })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(s: &str) -> RouteSpec {
        RouteSpec::parse(s).unwrap()
    }

    fn policy(toml_text: &str) -> Policy {
        #[derive(Deserialize)]
        struct F {
            policy: PolicySection,
        }
        toml::from_str::<F>(toml_text).unwrap().policy.build(999).unwrap()
    }

    #[test]
    fn the_default_keeps_others_off_privileged_ports() {
        let p = Policy::builtin(999);
        let nobody = Peer::known(5, 65534);
        assert!(p.may_claim(&Peer::known(1, 0), &spec("http://x.test:80"), "web").is_ok());
        assert!(p.may_claim(&Peer::known(1, 999), &spec("tcp://:444"), "web").is_ok());
        let refused = p.may_claim(&nobody, &spec("tcp://:444"), "web").unwrap_err();
        assert_eq!(refused.rule, "the default policy");
        assert!(refused.reason.contains("not 444 (a privileged port)"), "{refused}");
        assert!(p.may_claim(&nobody, &spec("http://x.test:8080/a"), "web").is_ok());
        assert!(p.may_administer(&nobody).is_err());
        assert!(p.may_administer(&Peer::known(1, 999)).is_ok());
    }

    #[test]
    fn rules_limit_ports_hosts_and_names_and_the_first_that_applies_decides() {
        let p = policy(
            r#"
            [[policy.rule]]
            uid = 1001
            ports = [8443, "9000-9009"]
            hosts = ["app.example.com", "*.alice.example.com"]
            services = ["alice-*"]
            [[policy.rule]]
            gid = [50]
            admin = true
            "#,
        );
        let alice = Peer::known(1, 1001);
        assert!(p.may_claim(&alice, &spec("http://app.example.com:9005/x"), "alice-web").is_ok());
        assert!(p.may_claim(&alice, &spec("tls://a.b.alice.example.com:8443"), "alice-web").is_ok());
        assert!(p.may_claim(&alice, &spec("tls://*.alice.example.com:8443"), "alice-web").is_ok());
        let e = p.may_claim(&alice, &spec("http://app.example.com:9010"), "alice-web").unwrap_err();
        assert!(e.rule.starts_with("policy rule 1 (uid 1001)") && e.reason.contains("8443, 9000-9009"), "{e}");
        let e = p.may_claim(&alice, &spec("http://bob.example.com:9000"), "alice-web").unwrap_err();
        assert!(e.reason.contains("not host bob.example.com"), "{e}");
        assert!(p.may_claim(&alice, &spec("http://:9000"), "alice-web").is_err(), "any host is not one of hers");
        assert!(p.may_claim(&alice, &spec("tcp://:9000"), "alice-web").is_err(), "a whole port is not hers");
        let e = p.may_claim(&alice, &spec("http://app.example.com:9000"), "bob").unwrap_err();
        assert!(e.reason.contains("not 'bob'"), "{e}");
        let staff = Peer { gid: 7, groups: vec![50], ..Peer::known(2, 1002) };
        assert!(p.may_administer(&staff).is_ok());
        assert!(p.may_claim(&staff, &spec("http://:2000"), "x").is_ok(), "defaults for ports, hosts, names");
        let e = p.may_claim(&Peer::known(3, 1003), &spec("http://:2000"), "x").unwrap_err();
        assert!(e.reason.contains("no [[policy.rule]] applies to uid 1003"), "{e}");
    }

    #[test]
    fn users_and_groups_are_looked_up_by_name() {
        assert_eq!(user_ids("root"), Some((0, 0)));
        assert_eq!(group_id("root"), Some(0));
        assert_eq!((user_ids("no-such-user-here"), group_id("no-such-group-here")), (None, None));
    }

    #[test]
    fn units_come_from_the_cgroup() {
        assert_eq!(unit_of("0::/system.slice/web.service\n").as_deref(), Some("web.service"));
        assert_eq!(unit_of("0::/system.slice/shop.service/worker").as_deref(), Some("shop.service"));
        // A user's own manager lets that user name units as it likes: not a system unit.
        assert_eq!(unit_of("0::/user.slice/user-1000.slice/user@1000.service/app.slice/shop.service").as_deref(), None);
        assert_eq!(unit_of("0::/user.slice/user-1000.slice/session-2.scope").as_deref(), None);
        assert_eq!(unit_of("").as_deref(), None);
    }

    #[test]
    fn bad_rules_say_what_to_write() {
        #[derive(Deserialize)]
        struct F {
            policy: PolicySection,
        }
        let build = |t: &str| toml::from_str::<F>(t).map_err(|e| e.to_string()).and_then(|f| f.policy.build(0));
        assert!(build("[[policy.rule]]\nports = [\"9-1\"]").unwrap_err().contains("range like"));
        assert!(build("[[policy.rule]]\nhosts = [\"a*b\"]").unwrap_err().contains("not a host"));
        assert!(build("[[policy.rule]]\nuser = \"no-such-user-here\"").unwrap_err().contains("/etc/passwd"));
        assert!(build("[[policy.rule]]\nport = 1").unwrap_err().contains("unknown field `port`"));
    }
}
