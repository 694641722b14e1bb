//! The core's decisions, deterministic: every input is given its time, every
//! effect is looked at. No socket, no task, no clock.

use super::*;
use crate::control::error::Holder;
use crate::forward::backend::{BackendSpec, Resolved};
use portmux_sys::net::Endpoint;
use portmux_wire::Proto;

const LINGER: Duration = Duration::from_secs(30);

fn core(park_limit: usize) -> Core {
    // uid 1000 is portmux's own (trusted like root); others are held to the default policy.
    let policy = Arc::new(Policy::builtin(1000));
    let (limits, hits) = (Limits::default(), Arc::default());
    Core::new(Config { linger: LINGER, park_limit, default_bind: "127.0.0.1".parse().unwrap(), policy, limits, hits })
}

/// Takes every effect, answering binds (with success, unless `fail` names
/// the port) as a driver would.
fn run(c: &mut Core, now: Instant, fail: &[u16]) -> Vec<Effect> {
    let mut out = Vec::new();
    while let Some(e) = c.poll_effect() {
        if let Effect::Bind { listener, addr } = &e {
            let result = if fail.contains(&addr.port()) {
                Err(std::io::Error::from_raw_os_error(libc::EADDRINUSE))
            } else {
                Ok(())
            };
            c.bound(now, *listener, result);
        }
        out.push(e);
    }
    out
}

fn done(effects: &[Effect]) -> Option<&Result<Outcome, ControlError>> {
    effects.iter().find_map(|e| match e {
        Effect::Done { result, .. } => Some(result),
        _ => None,
    })
}

fn register(c: &mut Core, now: Instant, s: SessionId, routes: &[&str]) -> (Result<Vec<Bound>, String>, Vec<Effect>) {
    let routes: Vec<String> = routes.iter().map(|r| r.to_string()).collect();
    c.register(now, s, &routes);
    let effects = run(c, now, &[]);
    let result = match done(&effects) {
        Some(Ok(Outcome::Registered(b))) => Ok(b.clone()),
        Some(Ok(other)) => panic!("unexpected outcome {other:?}"),
        Some(Err(e)) => Err(e.to_string()),
        None => panic!("no outcome in {effects:?}"),
    };
    (result, effects)
}

fn meta(proto: Proto, host: Option<&str>, path: Option<&str>) -> ConnMeta {
    ConnMeta {
        route: String::new(),
        proto,
        peer: "127.0.0.1:5000".parse().unwrap(),
        local: "127.0.0.1:8000".parse().unwrap(),
        sni: None,
        alpn: vec![],
        host: host.map(Into::into),
        path: path.map(Into::into),
        peeked: 10,
    }
}

fn conn(c: &Core, id: u64, port: u16, path: &str, arrived: Instant) -> ConnDesc {
    let listener = c.listener_for(SocketAddr::from(([127, 0, 0, 1], port))).expect("a listener on that port");
    ConnDesc {
        id: ConnId(id),
        listener,
        meta: meta(Proto::Http, Some("x"), Some(path)),
        arrived,
        rejected_by: None,
        returned: false,
        tls: None,
    }
}

fn delivers(effects: &[Effect]) -> Vec<(u64, SessionId, u64)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Deliver { session, desc, attempt } => Some((desc.id.0, *session, *attempt)),
            _ => None,
        })
        .collect()
}

fn answers(effects: &[Effect]) -> Vec<(u64, Option<u16>, String)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Answer { conn, reply } => {
                let (status, body) = match reply {
                    Reply::Http { status, body, .. } => (Some(*status), body.clone()),
                    other => (None, format!("{other:?}")),
                };
                Some((conn.0, status, body))
            }
            _ => None,
        })
        .collect()
}

fn target(c: &Core, port: u16) -> Vec<String> {
    c.plan()
        .ports
        .iter()
        .filter(|p| c.listeners()[&p.listener].addr.port() == port)
        .flat_map(|p| p.routes.iter())
        .map(|r| match &r.target {
            PlanTarget::Sessions(s) => {
                format!("{} -> sessions {:?}", r.display, s.iter().map(|s| s.0).collect::<Vec<_>>())
            }
            PlanTarget::Queue => format!("{} -> queue", r.display),
            PlanTarget::Forward(_) => format!("{} -> forward", r.display),
        })
        .collect()
}

fn backends(addr: &str) -> Resolved {
    vec![(BackendSpec::parse(addr).unwrap(), vec![Endpoint::Tcp(addr.parse().unwrap())])]
}

#[test]
fn a_route_belongs_to_one_service_whose_instances_form_a_pool() {
    let t0 = Instant::now();
    let mut c = core(16);
    let a = c.open_session("web".into(), Peer::known(10, 1000));
    let (bound, effects) = register(&mut c, t0, a, &["http://:8000"]);
    assert_eq!(bound.unwrap()[0].listen.to_string(), "127.0.0.1:8000");
    assert!(effects.iter().any(|e| matches!(e, Effect::Bind { .. })), "the first route opens its listener");
    assert!(
        effects.iter().any(|e| matches!(e, Effect::Publish)) && effects.iter().any(|e| matches!(e, Effect::Persist))
    );
    // A second instance of the same service joins the pool; no new listener.
    let b = c.open_session("web".into(), Peer::known(11, 1000));
    let (bound, effects) = register(&mut c, t0, b, &["http://:8000"]);
    assert!(bound.is_ok() && !effects.iter().any(|e| matches!(e, Effect::Bind { .. })));
    assert_eq!(target(&c, 8000), ["http://:8000 -> sessions [1, 2]"]);
    // Another service is refused, naming the holder.
    let other = c.open_session("other".into(), Peer::known(12, 1001));
    c.register(t0, other, &["http://:8000".into()]);
    let effects = run(&mut c, t0, &[]);
    match done(&effects) {
        Some(Err(ControlError::Held { holder: Holder::Service { service, pid, uid }, .. })) => {
            assert_eq!((service.as_str(), *pid, *uid), ("web", 10, 1000));
        }
        other => panic!("{other:?}"),
    }
    // Nor may the admin API take it.
    let spec = RouteSpec::parse("http://:8000").unwrap();
    c.set_backends(t0, spec, backends("127.0.0.1:9"));
    let effects = run(&mut c, t0, &[]);
    assert!(matches!(done(&effects), Some(Err(ControlError::Held { .. }))), "{effects:?}");
    // A route with backends is refused to services, and the reverse holds too.
    c.set_backends(t0, RouteSpec::parse("tcp://:9000").unwrap(), backends("127.0.0.1:9"));
    assert!(matches!(done(&run(&mut c, t0, &[])), Some(Ok(Outcome::RouteSet(_)))));
    let (refused, _) = register(&mut c, t0, other, &["tcp://:9000"]);
    assert!(refused.unwrap_err().contains("forwards to backends set through the admin API"));
    assert!(matches!(c.remove_route(t0, "http://:8000"), Err(ControlError::ServiceRoute { .. })));
    assert_eq!(c.remove_route(t0, "tcp://:9000").unwrap(), "tcp://:9000");
}

#[test]
fn registration_is_all_or_nothing_and_bind_failures_keep_their_cause() {
    let t0 = Instant::now();
    let mut c = core(16);
    let s = c.open_session("svc".into(), Peer::known(1, 0));
    // The second address is taken by another process: nothing is kept.
    c.register(t0, s, &["http://:8001".into(), "tcp://:8002".into()]);
    let effects = run(&mut c, t0, &[8002]);
    match done(&effects) {
        Some(Err(e @ ControlError::Bind { route, addr, .. })) => {
            assert_eq!((route.as_str(), addr.port()), ("tcp://:8002", 8002));
            assert!(e.to_string().contains("another process uses this address"), "{e}");
            let source = std::error::Error::source(e).and_then(|s| s.downcast_ref::<std::io::Error>());
            assert_eq!(source.and_then(std::io::Error::raw_os_error), Some(libc::EADDRINUSE));
        }
        other => panic!("{other:?}"),
    }
    let closed: Vec<u16> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Close { addr, .. } => Some(addr.port()),
            _ => None,
        })
        .collect();
    assert_eq!(closed, [8001], "the listener opened for the first route is closed again");
    assert!(c.routes().is_empty() && c.listeners().is_empty());
    // Bad specs, mismatched names, service-only options and overlaps say what is wrong.
    let (bad, _) = register(&mut c, t0, s, &["http://:8001/ok", "bogus"]);
    assert!(bad.unwrap_err().contains("bogus") || c.routes().is_empty());
    let (named, _) = register(&mut c, t0, s, &["http://:8001?name=other"]);
    assert!(named.unwrap_err().contains("names service 'other'"));
    let (lb, _) = register(&mut c, t0, s, &["http://:8001?lb=least_conn"]);
    assert!(lb.unwrap_err().contains("apply to routes with backends"));
    assert!(register(&mut c, t0, s, &["http://:8001"]).0.is_ok());
    let (overlap, _) = register(&mut c, t0, s, &["tcp://0.0.0.0:8001"]);
    assert!(overlap.unwrap_err().contains("overlaps"));
    let (empty, _) = register(&mut c, t0, s, &[]);
    assert_eq!(empty.unwrap_err(), "Register needs at least one route");
}

#[test]
fn connections_go_to_the_most_specific_route() {
    let t0 = Instant::now();
    let mut c = core(16);
    let s = c.open_session("svc".into(), Peer::known(1, 0));
    register(&mut c, t0, s, &["http://:8000", "http://:8000/a", "http://:8000/a/b", "http://api.test:8000"]).0.unwrap();
    c.session_ended(t0, s);
    run(&mut c, t0, &[]);
    for (id, host, path, want) in [
        (1, "x", "/a/x", "http://:8000/a"),
        (2, "x", "/a/b/c", "http://:8000/a/b"),
        (3, "x", "/ab", "http://:8000"),
        (4, "api.test", "/a", "http://api.test:8000"),
    ] {
        let mut d = conn(&c, id, 8000, path, t0);
        d.meta.host = Some(host.into());
        c.arrived(t0, d);
        let effects = run(&mut c, t0, &[]);
        assert!(effects.iter().any(|e| matches!(e, Effect::Watch { conn } if conn.0 == id)), "{effects:?}");
        assert_eq!(c.conn(ConnId(id)).unwrap().desc.meta.route, want);
    }
    // Nothing matches on a port without a catch-all: 404 naming what was asked.
    let t = c.open_session("tls".into(), Peer::known(2, 0));
    register(&mut c, t0, t, &["http://only.test:8100"]).0.unwrap();
    c.arrived(t0, conn(&c, 9, 8100, "/nope", t0));
    let a = answers(&run(&mut c, t0, &[]));
    assert_eq!((a[0].0, a[0].1), (9, Some(404)));
}

#[test]
fn a_departed_service_keeps_its_route_reserved_then_it_is_released() {
    let t0 = Instant::now();
    let mut c = core(16);
    let s = c.open_session("web".into(), Peer::known(7, 1000));
    register(&mut c, t0, s, &["http://:8000"]).0.unwrap();
    c.session_ended(t0, s);
    run(&mut c, t0, &[]);
    assert_eq!(target(&c, 8000), ["http://:8000 -> queue"], "connections queue meanwhile");
    assert_eq!(c.poll_timeout(), Some(t0 + LINGER));
    // Another service is told when the route comes free.
    let t10 = t0 + Duration::from_secs(10);
    let other = c.open_session("other".into(), Peer::known(8, 1001));
    c.register(t10, other, &["http://:8000".into()]);
    match done(&run(&mut c, t10, &[])) {
        Some(Err(ControlError::Held { holder: Holder::Reserved { service, left_s, release_in_s, .. }, .. })) => {
            assert_eq!((service.as_str(), *left_s, *release_in_s), ("web", 10, 20));
        }
        other => panic!("{other:?}"),
    }
    // A client waits; at the end of the reservation it gets a 503 saying why.
    c.arrived(t10, conn(&c, 1, 8000, "/", t10));
    run(&mut c, t10, &[]);
    let end = t0 + LINGER;
    c.timeout(end - Duration::from_millis(1));
    assert!(answers(&run(&mut c, end, &[])).is_empty(), "nothing happens early");
    c.timeout(end);
    let effects = run(&mut c, end, &[]);
    let a = answers(&effects);
    assert_eq!((a[0].0, a[0].1), (1, Some(503)));
    assert!(a[0].2.contains("did not come back within 30s"), "{}", a[0].2);
    assert!(c.routes().is_empty());
    // The listener stays for another linger period, then closes.
    assert_eq!(c.poll_timeout(), Some(end + LINGER));
    c.timeout(end + LINGER);
    let effects = run(&mut c, end + LINGER, &[]);
    assert!(effects.iter().any(|e| matches!(e, Effect::Close { addr, .. } if addr.port() == 8000)));
    assert!(c.listeners().is_empty());
}

#[test]
fn the_service_that_comes_back_gets_the_queue_in_arrival_order_one_at_a_time() {
    let t0 = Instant::now();
    let mut c = core(16);
    let s = c.open_session("web".into(), Peer::known(7, 1000));
    register(&mut c, t0, s, &["http://:8000"]).0.unwrap();
    c.session_ended(t0, s);
    for id in 1..=3 {
        c.arrived(t0, conn(&c, id, 8000, "/", t0));
    }
    run(&mut c, t0, &[]);
    let back = c.open_session("web".into(), Peer::known(9, 1000));
    let (_, effects) = register(&mut c, t0, back, &["http://:8000"]);
    let first = delivers(&effects);
    assert_eq!(first.iter().map(|d| d.0).collect::<Vec<_>>(), [1], "one delivery at a time");
    assert_eq!(target(&c, 8000), ["http://:8000 -> queue"], "workers queue behind the queue");
    c.delivered(t0, ConnId(1), first[0].2);
    let second = delivers(&run(&mut c, t0, &[]));
    assert_eq!(second[0].0, 2);
    c.delivered(t0, ConnId(2), second[0].2);
    let third = delivers(&run(&mut c, t0, &[]));
    c.delivered(t0, ConnId(3), third[0].2);
    run(&mut c, t0, &[]);
    assert_eq!(third[0].0, 3);
    assert_eq!(target(&c, 8000), ["http://:8000 -> sessions [2]"], "workers deliver directly again");
}

#[test]
fn queues_are_bounded_and_a_half_closed_client_gives_its_place_up_first() {
    let t0 = Instant::now();
    let mut c = core(2);
    let s = c.open_session("web".into(), Peer::known(7, 1000));
    register(&mut c, t0, s, &["http://:8000"]).0.unwrap();
    c.session_ended(t0, s);
    c.arrived(t0, conn(&c, 1, 8000, "/", t0));
    c.arrived(t0, conn(&c, 2, 8000, "/", t0));
    c.arrived(t0, conn(&c, 3, 8000, "/", t0));
    let a = answers(&run(&mut c, t0, &[]));
    assert_eq!((a[0].0, a[0].1), (3, Some(503)));
    assert!(a[0].2.contains("is full (2 connections)"), "{}", a[0].2);
    // Half-closed: it keeps its place...
    c.hung_up(ConnId(1), HangUp::HalfClosed);
    assert!(run(&mut c, t0, &[]).is_empty());
    assert!(c.conn(ConnId(1)).is_some_and(|h| h.half_closed));
    // ...until the queue is full and someone new arrives.
    c.arrived(t0, conn(&c, 4, 8000, "/", t0));
    let a = answers(&run(&mut c, t0, &[]));
    assert_eq!(a.iter().map(|a| a.0).collect::<Vec<_>>(), [1]);
    assert!(c.conn(ConnId(4)).is_some());
    // A client that is gone frees its place at once, without an answer.
    c.hung_up(ConnId(2), HangUp::Gone);
    let effects = run(&mut c, t0, &[]);
    assert!(matches!(effects.as_slice(), [Effect::Forget { conn }] if conn.0 == 2), "{effects:?}");
    // A connection that waited the linger period gets its 503.
    c.timeout(t0 + LINGER);
    let a = answers(&run(&mut c, t0 + LINGER, &[]));
    assert!(a.iter().any(|a| a.0 == 4 && a.1 == Some(503)), "{a:?}");
}

#[test]
fn a_rejected_connection_avoids_its_rejecter_for_a_while() {
    let t0 = Instant::now();
    let mut c = core(16);
    let a = c.open_session("pool".into(), Peer::known(1, 0));
    register(&mut c, t0, a, &["http://:8000"]).0.unwrap();
    let mut d = conn(&c, 1, 8000, "/", t0);
    d.rejected_by = Some((a, t0));
    c.arrived(t0, d.clone());
    assert!(delivers(&run(&mut c, t0, &[])).is_empty(), "the only instance just rejected it");
    assert_eq!(c.poll_timeout(), Some(t0 + REJECT_BACKOFF));
    // Another instance arrives: it gets the connection now.
    let b = c.open_session("pool".into(), Peer::known(2, 0));
    let (_, effects) = register(&mut c, t0, b, &["http://:8000"]);
    assert_eq!(delivers(&effects).iter().map(|d| (d.0, d.1)).collect::<Vec<_>>(), [(1, b)]);
    // With only the rejecter, the backoff ends and it is tried again.
    let mut c = core(16);
    let a = c.open_session("pool".into(), Peer::known(1, 0));
    register(&mut c, t0, a, &["http://:8000"]).0.unwrap();
    c.arrived(t0, d);
    run(&mut c, t0, &[]);
    c.timeout(t0 + REJECT_BACKOFF);
    assert_eq!(delivers(&run(&mut c, t0 + REJECT_BACKOFF, &[])).iter().map(|d| d.1).collect::<Vec<_>>(), [a]);
}

#[test]
fn failed_deliveries_go_back_to_the_head_of_the_queue() {
    let t0 = Instant::now();
    let mut c = core(16);
    let a = c.open_session("pool".into(), Peer::known(1, 0));
    let b = c.open_session("pool".into(), Peer::known(2, 0));
    register(&mut c, t0, a, &["http://:8000"]).0.unwrap();
    register(&mut c, t0, b, &["http://:8000"]).0.unwrap();
    c.arrived(t0, conn(&c, 1, 8000, "/", t0));
    c.arrived(t0, conn(&c, 2, 8000, "/", t0));
    let d = delivers(&run(&mut c, t0, &[]));
    assert_eq!(d.len(), 1);
    let (first, to, attempt) = d[0];
    // A dead session: the same connection goes to the other instance at once.
    assert!(c.undelivered(t0, ConnId(first), attempt, Undelivered::Dead));
    let d = delivers(&run(&mut c, t0, &[]));
    assert_eq!((d[0].0, d[0].1 != to), (first, true));
    assert!(!c.sessions()[&to].usable);
    // A busy one: wait a little, then try again (the order is kept).
    assert!(c.undelivered(t0, ConnId(first), d[0].2, Undelivered::Busy));
    assert!(delivers(&run(&mut c, t0, &[])).is_empty());
    assert_eq!(c.poll_timeout(), Some(t0 + BUSY_BACKOFF));
    c.timeout(t0 + BUSY_BACKOFF);
    let d = delivers(&run(&mut c, t0 + BUSY_BACKOFF, &[]));
    assert_eq!(d[0].0, first);
    // A stale report (an earlier attempt) changes nothing.
    assert!(!c.undelivered(t0, ConnId(first), attempt, Undelivered::Busy));
    c.delivered(t0, ConnId(first), attempt);
    assert!(c.conn(ConnId(first)).is_some(), "only the current attempt's report counts");
}

#[test]
fn unacked_connections_of_a_session_that_died_are_routed_again() {
    let t0 = Instant::now();
    let mut c = core(16);
    let a = c.open_session("pool".into(), Peer::known(1, 0));
    register(&mut c, t0, a, &["http://:8000"]).0.unwrap();
    c.arrived(t0, conn(&c, 1, 8000, "/", t0));
    let d = delivers(&run(&mut c, t0, &[]));
    // The session ends before the delivery is reported; its unacked come back.
    c.session_ended(t0, a);
    c.arrived(t0, conn(&c, 1, 8000, "/", t0));
    run(&mut c, t0, &[]);
    c.delivered(t0, ConnId(1), d[0].2);
    assert!(
        matches!(c.conn(ConnId(1)).map(|h| &h.place), Some(Place::Queued(_))),
        "queued while the route is reserved"
    );
    let b = c.open_session("pool".into(), Peer::known(2, 0));
    let (_, effects) = register(&mut c, t0, b, &["http://:8000"]);
    assert_eq!(delivers(&effects).iter().map(|d| (d.0, d.1)).collect::<Vec<_>>(), [(1, b)]);
}

#[test]
fn a_freeze_holds_everything_until_a_thaw_or_a_commit() {
    let t0 = Instant::now();
    let mut c = core(16);
    let s = c.open_session("web".into(), Peer::known(1, 0));
    register(&mut c, t0, s, &["http://:8000"]).0.unwrap();
    c.set_backends(t0, RouteSpec::parse("tcp://:9000").unwrap(), backends("127.0.0.1:9"));
    run(&mut c, t0, &[]);
    c.session_ended(t0, s);
    c.arrived(t0, conn(&c, 1, 8000, "/", t0));
    run(&mut c, t0, &[]);
    c.freeze();
    assert!(run(&mut c, t0, &[]).iter().any(|e| matches!(e, Effect::Publish)));
    assert_eq!(target(&c, 9000), ["tcp://:9000 -> queue"], "even forwarding routes queue while frozen");
    assert_eq!(c.poll_timeout(), None, "nothing expires in a frozen state");
    c.timeout(t0 + LINGER * 3);
    assert!(run(&mut c, t0, &[]).is_empty() && c.conn(ConnId(1)).is_some());
    c.arrived(t0, conn(&c, 2, 8000, "/", t0));
    assert!(run(&mut c, t0, &[]).is_empty(), "arrivals wait, in order");
    assert_eq!(c.queued().iter().map(|d| d.id.0).collect::<Vec<_>>(), [1], "what an export sends");
    // A thaw serves again: the waiting arrival is routed.
    c.thaw(t0);
    run(&mut c, t0, &[]);
    assert!(matches!(c.conn(ConnId(2)).map(|h| &h.place), Some(Place::Queued(_))));
    assert_eq!(target(&c, 9000), ["tcp://:9000 -> forward"]);
    // A commit hands arrivals on and forgets what the new process has copies of.
    c.freeze();
    c.arrived(t0, conn(&c, 3, 8000, "/", t0));
    run(&mut c, t0, &[]);
    c.commit();
    let effects = run(&mut c, t0, &[]);
    let handed: Vec<u64> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::HandOn { desc, .. } => Some(desc.id.0),
            _ => None,
        })
        .collect();
    let mut forgotten: Vec<u64> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Forget { conn } => Some(conn.0),
            _ => None,
        })
        .collect();
    forgotten.sort();
    assert_eq!((handed, forgotten), (vec![3], vec![1, 2]));
    assert!(!effects.iter().any(|e| matches!(e, Effect::Publish | Effect::Close { .. })), "the frozen table stays");
    c.arrived(t0, ConnDesc { id: ConnId(4), listener: ListenerId(1), ..conn_at(t0) });
    assert!(matches!(run(&mut c, t0, &[]).as_slice(), [Effect::HandOn { desc, .. }] if desc.id.0 == 4));
}

fn conn_at(t: Instant) -> ConnDesc {
    ConnDesc {
        id: ConnId(0),
        listener: ListenerId(0),
        meta: meta(Proto::Tcp, None, None),
        arrived: t,
        rejected_by: None,
        returned: false,
        tls: None,
    }
}

#[test]
fn stopping_answers_every_waiting_connection() {
    let t0 = Instant::now();
    let mut c = core(16);
    let s = c.open_session("web".into(), Peer::known(1, 0));
    register(&mut c, t0, s, &["http://:8000", "tcp://:8001"]).0.unwrap();
    c.session_ended(t0, s);
    c.arrived(t0, conn(&c, 1, 8000, "/", t0));
    let tcp =
        ConnDesc { id: ConnId(2), listener: c.listener_for("127.0.0.1:8001".parse().unwrap()).unwrap(), ..conn_at(t0) };
    c.arrived(t0, tcp);
    run(&mut c, t0, &[]);
    c.stop();
    let a = answers(&run(&mut c, t0, &[]));
    assert_eq!(a.len(), 2);
    assert_eq!((a[0].0, a[0].1), (1, Some(503)));
    assert!(a[0].2.contains("portmux is stopping"));
    assert_eq!((a[1].0, a[1].1), (2, None), "not HTTP: a clean close");
}

#[test]
fn an_import_reserves_routes_nobody_holds_and_keeps_pinned_listeners() {
    let t0 = Instant::now();
    let mut c = core(16);
    c.begin_import();
    let pinned = c.adopt_listener(t0, Some(ListenerId(5)), "127.0.0.1:8443".parse().unwrap(), true);
    c.adopt_listener(t0, Some(ListenerId(6)), "127.0.0.1:8000".parse().unwrap(), false);
    c.import_service_route("http://:8000", "web".into(), 0, None).unwrap();
    assert!(run(&mut c, t0, &[]).is_empty(), "nothing is published while importing");
    c.end_import(t0);
    let effects = run(&mut c, t0, &[]);
    assert!(effects.iter().any(|e| matches!(e, Effect::Publish)));
    let RouteTarget::Service(s) = &c.routes().values().next().unwrap().target else { panic!() };
    assert_eq!(s.reserved_until, Some(t0 + LINGER));
    assert_eq!(pinned, ListenerId(5));
    // Long after, the pinned listener is still there; the other closed with its route.
    for t in [t0 + LINGER, t0 + LINGER * 2, t0 + LINGER * 3] {
        c.timeout(t);
        run(&mut c, t, &[]);
    }
    let left: Vec<u16> = c.listeners().values().map(|l| l.addr.port()).collect();
    assert_eq!(left, [8443]);
}

#[test]
fn a_backoff_left_with_nothing_to_deliver_sets_no_deadline() {
    let t0 = Instant::now();
    let mut c = core(16);
    let a = c.open_session("pool".into(), Peer::known(1, 0));
    register(&mut c, t0, a, &["http://:8000"]).0.unwrap();
    c.arrived(t0, conn(&c, 1, 8000, "/", t0));
    let d = delivers(&run(&mut c, t0, &[]));
    assert!(c.undelivered(t0, ConnId(1), d[0].2, Undelivered::Busy));
    run(&mut c, t0, &[]);
    assert_eq!(c.poll_timeout(), Some(t0 + BUSY_BACKOFF));
    // The client leaves: nothing waits for the backoff any more.
    c.hung_up(ConnId(1), HangUp::Gone);
    run(&mut c, t0, &[]);
    assert_eq!(c.poll_timeout(), None, "a deadline with nothing to do would wake the timer forever");
    // And a stale backoff does not hold up the next arrival.
    let later = t0 + BUSY_BACKOFF * 2;
    c.arrived(later, conn(&c, 2, 8000, "/", later));
    assert_eq!(delivers(&run(&mut c, later, &[])).iter().map(|d| d.0).collect::<Vec<_>>(), [2]);
}

#[test]
fn deliveries_that_fail_while_frozen_or_stopping_are_handed_on_or_answered() {
    let t0 = Instant::now();
    let mut c = core(16);
    let a = c.open_session("web".into(), Peer::known(1, 0));
    register(&mut c, t0, a, &["http://:8000"]).0.unwrap();
    c.arrived(t0, conn(&c, 1, 8000, "/", t0));
    c.arrived(t0, conn(&c, 2, 8000, "/", t0));
    let d = delivers(&run(&mut c, t0, &[]));
    // Frozen: the failed delivery waits with the arrivals, not in the exported queue.
    c.freeze();
    assert!(c.undelivered(t0, ConnId(1), d[0].2, Undelivered::Closed));
    run(&mut c, t0, &[]);
    assert_eq!(c.queued().iter().map(|d| d.id.0).collect::<Vec<_>>(), [2]);
    c.commit();
    let effects = run(&mut c, t0, &[]);
    let handed: Vec<(u64, u16)> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::HandOn { desc, listener } => Some((desc.id.0, listener.port())),
            _ => None,
        })
        .collect();
    assert_eq!(handed, [(1, 8000)], "handed on, naming its listener");
    // Stopping: a delivery that comes back is answered.
    let mut c = core(16);
    let a = c.open_session("web".into(), Peer::known(1, 0));
    register(&mut c, t0, a, &["http://:8000"]).0.unwrap();
    c.arrived(t0, conn(&c, 1, 8000, "/", t0));
    let d = delivers(&run(&mut c, t0, &[]));
    c.stop();
    assert!(run(&mut c, t0, &[]).is_empty(), "a delivery in flight is not answered twice");
    assert!(c.undelivered(t0, ConnId(1), d[0].2, Undelivered::Dead));
    let a = answers(&run(&mut c, t0, &[]));
    assert_eq!((a[0].0, a[0].1), (1, Some(503)));
    // An unsendable connection is answered and leaves the session usable.
    let mut c = core(16);
    let s = c.open_session("web".into(), Peer::known(1, 0));
    register(&mut c, t0, s, &["http://:8000"]).0.unwrap();
    c.arrived(t0, conn(&c, 1, 8000, "/", t0));
    let d = delivers(&run(&mut c, t0, &[]));
    assert!(c.undelivered(t0, ConnId(1), d[0].2, Undelivered::Unsendable));
    let a = answers(&run(&mut c, t0, &[]));
    assert_eq!((a[0].0, a[0].1), (1, Some(431)));
    assert!(c.sessions()[&s].usable);
}

#[test]
fn another_uid_never_gets_what_one_uid_holds_or_reserves() {
    let t0 = Instant::now();
    let mut c = core(16);
    let root = c.open_session("web".into(), Peer::known(10, 0));
    assert!(register(&mut c, t0, root, &["http://held.test:8000", "tls://*.corp.test:8443"]).0.is_ok());
    let nobody = |c: &mut Core, name: &str| c.open_session(name.into(), Peer::known(20, 65534));
    let refused = |c: &mut Core, s, route: &str| register(c, t0, s, &[route]).0.expect_err(route);
    // The same name: the name is root's, not shared with another uid.
    let same = nobody(&mut c, "web");
    let e = refused(&mut c, same, "http://held.test:8000");
    assert!(e.contains("ownership rule: the service name 'web' is held by service 'web' (pid 10, uid 0)"), "{e}");
    // A path under root's host, a name under root's suffix, the whole port.
    let other = nobody(&mut c, "login");
    for (route, what) in [
        ("http://held.test:8000/login", "host held.test on port 8000"),
        ("tls://a.corp.test:8443", "a.corp.test, which is under *.corp.test"),
        ("tls://*.x.corp.test:8443", "*.x.corp.test, which is under *.corp.test"),
        ("tls://*.corp.test:8443/", "is held by service 'web' (pid 10, uid 0)"),
    ] {
        let e = refused(&mut c, other, route);
        assert!(e.contains(what), "{route}: {e}");
    }
    // A privileged port, by the default policy.
    let e = refused(&mut c, other, "tcp://:444");
    assert!(e.contains("refused by the default policy") && e.contains("not 444 (a privileged port)"), "{e}");
    // A catch-all would get root's host's other paths: refused. Another host is its own.
    let e = refused(&mut c, other, "http://:8000");
    assert!(e.contains("a route on port 8000 (http://held.test:8000)"), "{e}");
    assert!(register(&mut c, t0, other, &["http://mine.test:8000"]).0.is_ok());
    // A third uid gets neither that host nor a path under it; a session that
    // only said Hello with a name owns nothing.
    let third = c.open_session("third".into(), Peer::known(30, 4000));
    let e = refused(&mut c, third, "http://mine.test:8000/x");
    assert!(e.contains("host mine.test on port 8000 is held by service 'login'"), "{e}");
    let _squatter = c.open_session("fourth".into(), Peer::known(40, 5000));
    let fourth = c.open_session("fourth".into(), Peer::known(41, 4000));
    assert!(register(&mut c, t0, fourth, &["http://fourth.test:8001"]).0.is_ok(), "the name is not the squatter's");
    // While root's service is away its routes stay reserved: still not the other uid's.
    c.session_ended(t0, root);
    run(&mut c, t0, &[]);
    let e = refused(&mut c, same, "http://held.test:8000");
    assert!(e.contains("the service name 'web'") && e.contains("reserved for it"), "{e}");
    // Once the reservation ends, the name and the host are free.
    c.timeout(t0 + LINGER);
    run(&mut c, t0 + LINGER, &[]);
    assert!(register(&mut c, t0 + LINGER, same, &["http://held.test:8000"]).0.is_ok());
}

#[test]
fn a_route_from_an_older_release_is_taken_back_by_its_own_service() {
    let t0 = Instant::now();
    let mut c = core(16);
    c.begin_import();
    c.import_service_route("http://old.test:8000", "web".into(), portmux_wire::UNKNOWN_OWNER, None).unwrap();
    c.end_import(t0);
    run(&mut c, t0, &[]);
    // Another service of an unprivileged uid may not have its host…
    let other = c.open_session("other".into(), Peer::known(20, 65534));
    let e = register(&mut c, t0, other, &["http://old.test:8000/x"]).0.unwrap_err();
    assert!(e.contains("host old.test on port 8000"), "{e}");
    // …but the service itself, whatever its uid, comes back to it and owns it from then on.
    let web = c.open_session("web".into(), Peer::known(21, 4000));
    assert!(register(&mut c, t0, web, &["http://old.test:8000"]).0.is_ok());
    let same_name = c.open_session("web".into(), Peer::known(22, 65534));
    let e = register(&mut c, t0, same_name, &["http://old.test:8000"]).0.unwrap_err();
    assert!(e.contains("the service name 'web'") && e.contains("uid 4000"), "{e}");
}

#[test]
fn a_lend_route_lends_its_port_to_each_session_that_takes_connections() {
    let t0 = Instant::now();
    let mut c = core(16);
    let lends = |effects: &[Effect]| -> Vec<SessionId> {
        effects
            .iter()
            .filter_map(|e| if let Effect::Lend { session, .. } = e { Some(*session) } else { None })
            .collect()
    };
    let lent = |c: &Core| c.plan().ports.iter().any(|p| p.lent);
    let a = c.open_session("web".into(), Peer::known(10, 1000));
    let (bound, effects) = register(&mut c, t0, a, &["http://:8000?lend"]);
    assert_eq!(bound.unwrap()[0].route, "http://:8000?lend");
    assert_eq!(lends(&effects), [a]);
    assert!(lent(&c));
    // A second instance gets its own loan; the first is not sent it again.
    let b = c.open_session("web".into(), Peer::known(11, 1000));
    let (_, effects) = register(&mut c, t0, b, &["http://:8000?lend"]);
    assert_eq!(lends(&effects), [b]);
    // Draining, a session holds no loan; while another does, the port stays lent.
    c.drain(a);
    assert!(lends(&run(&mut c, t0, &[])).is_empty() && lent(&c));
    let listener = c.listener_for("127.0.0.1:8000".parse().unwrap()).unwrap();
    assert_eq!(c.borrowers(listener).map(|s| s.iter().copied().collect::<Vec<_>>()), Some(vec![b]));
    // A loan that could not be sent gives the port back to the workers, for good.
    c.loan_failed(listener, b);
    let effects = run(&mut c, t0, &[]);
    assert!(!lent(&c) && effects.iter().any(|e| matches!(e, Effect::Publish)));
    assert!(lends(&effects).is_empty(), "not offered again");
    // The route goes with its reservation: its listener closes then, shut down.
    c.session_ended(t0, a);
    c.session_ended(t0, b);
    run(&mut c, t0, &[]);
    c.timeout(t0 + LINGER);
    let effects = run(&mut c, t0 + LINGER, &[]);
    assert!(
        effects.iter().any(|e| matches!(e, Effect::Close { revoke: true, addr, .. } if addr.port() == 8000)),
        "{effects:?}"
    );

    // A lent port has no other route, in one registration or across two.
    let x = c.open_session("x".into(), Peer::known(12, 1000));
    let (refused, _) = register(&mut c, t0, x, &["http://:8001?lend", "http://a.test:8001"]);
    assert!(refused.unwrap_err().contains("lends port 8001"));
    let (_, _) = register(&mut c, t0, x, &["http://a.test:8002"]);
    let (refused, _) = register(&mut c, t0, x, &["tcp://:8002?lend"]);
    assert!(refused.unwrap_err().contains("no other route (http://a.test:8002)"));
    // systemd's sockets are lent only to the privileged.
    c.adopt_listener(t0, None, "127.0.0.1:8003".parse().unwrap(), true);
    let other = c.open_session("other".into(), Peer::known(13, 1001));
    let (refused, _) = register(&mut c, t0, other, &["tcp://:8003?lend"]);
    assert!(refused.unwrap_err().contains("could not take back from uid 1001"));
    let (ok, effects) = register(&mut c, t0, x, &["tcp://:8003?lend"]);
    assert!(ok.is_ok() && lends(&effects) == [x]);
}
