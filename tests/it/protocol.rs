//! Bad control input: every malformed, oversized or out-of-order message gets
//! an error naming the problem, ends that session alone, and loses nothing.

use crate::util::*;
use portmux_wire::{Message, PROTOCOL_VERSION};
use std::os::fd::AsFd;

fn hello(service: &str) -> Message {
    Message::Hello { version: PROTOCOL_VERSION, service: service.into() }
}

/// The next message must be an Error; then the session must end.
fn expect_error(s: &RawSession) -> String {
    match s.recv() {
        Some((Message::Error { reason }, None)) => {
            assert!(s.recv().is_none(), "the session ends after an error");
            reason
        }
        other => panic!("expected an Error, got {other:?}"),
    }
}

#[test]
fn malformed_and_out_of_order_messages_end_only_their_own_session() {
    let pm = Portmux::start(&[]);
    let port = free_port();
    let _svc = Service::hello(&pm, &format!("http://:{port}"), "unaffected", &[]);
    type Case = (&'static str, fn(&RawSession), &'static str);
    let cases: &[Case] = &[
        ("garbage", |s| s.send_bytes(b"GET / HTTP/1.1\r\n\r\n").unwrap(), "malformed message"),
        ("Register before Hello", |s| s.send(&Message::Register { routes: vec![] }), "must be Hello, not Register"),
        (
            "another protocol version",
            |s| s.send(&Message::Hello { version: 99, service: "x".into() }),
            "protocol version 99 is not supported: this portmux speaks versions 1 to 3",
        ),
        ("a bad service name", |s| s.send(&hello("no spaces")), "service name 'no spaces' is invalid"),
        ("an oversized message", |s| s.send_bytes(&vec![1u8; 70_000]).unwrap(), "exceeds the 65536-byte limit"),
        (
            "Hello twice",
            |s| {
                s.send(&hello("twice"));
                s.send(&hello("twice"));
            },
            "Hello was already sent",
        ),
        (
            "a message only portmux sends",
            |s| {
                s.send(&hello("confused"));
                s.send(&Message::Registered { routes: vec![] });
            },
            "Registered is a message portmux sends",
        ),
        (
            "a message with an fd",
            |s| {
                s.send(&hello("leaky"));
                let bytes = portmux_wire::encode(&Message::Drain).unwrap();
                s.send_with_fd(&bytes, std::io::stdin().as_fd()).unwrap();
            },
            "must not send file descriptors",
        ),
        (
            "trailing bytes",
            |s| {
                s.send(&hello("trailing"));
                let mut bytes = portmux_wire::encode(&Message::Bye).unwrap();
                bytes.push(0);
                s.send_bytes(&bytes).unwrap();
            },
            "1 unexpected bytes after a complete Bye",
        ),
    ];
    for (what, misbehave, want) in cases {
        let s = RawSession::connect(pm.control());
        misbehave(&s);
        let reason = expect_error(&s);
        assert!(reason.contains(want), "{what}: {reason}");
        // Everyone else is still served.
        assert_eq!(get(port, "x", "/").unwrap().body, "unaffected", "after {what}");
    }
}

#[test]
fn refused_registrations_say_why_and_the_session_carries_on() {
    let pm = Portmux::start(&[]);
    let (port, busy_port, other_port) = (free_port(), free_port(), free_port());
    let s = RawSession::connect(pm.control());
    s.send(&hello("svc"));
    let register = |routes: &[&str]| {
        s.send(&Message::Register { routes: routes.iter().map(|r| r.to_string()).collect() });
        s.recv().map(|(m, _)| m)
    };
    let refused = |m: Option<Message>| match m {
        Some(Message::Refused { route, reason }) => format!("{route}: {reason}"),
        other => panic!("expected Refused, got {other:?}"),
    };
    assert!(refused(register(&["nonsense"])).contains("has no scheme"));
    let text = refused(register(&[&format!("https://x.test:{port}?cert=/nonexistent.pem&key=b")]));
    assert!(text.contains("cannot read /nonexistent.pem"), "{text}");
    let text = refused(register(&[&format!("https://x.test:{port}")]));
    assert!(text.contains("needs a certificate") && text.contains("RegisterTls"), "{text}");
    assert!(refused(register(&[&format!("http://:{port}?name=other")])).contains("names service 'other'"));
    let _blocker = std::net::TcpListener::bind(("127.0.0.1", busy_port)).unwrap();
    assert!(refused(register(&[&format!("tcp://:{busy_port}")])).contains("another process uses this address"));
    // All or nothing: one bad route refuses the whole registration.
    let text = refused(register(&[&format!("http://:{other_port}/ok"), "bogus"]));
    assert!(text.starts_with("bogus:"), "{text}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", other_port)).is_err(), "nothing was opened");

    match register(&[&format!("http://:{port}/A/"), &format!("http://:{port}/b")]) {
        Some(Message::Registered { routes }) => {
            let names: Vec<_> = routes.iter().map(|b| (b.route.as_str(), b.listen.to_string())).collect();
            let listen = format!("127.0.0.1:{port}");
            let (a, b) = (format!("http://:{port}/A"), format!("http://:{port}/b"));
            assert_eq!(names, [(a.as_str(), listen.clone()), (b.as_str(), listen)]);
        }
        other => panic!("expected Registered, got {other:?}"),
    }
    // A wildcard address on the same port overlaps the existing listener.
    assert!(refused(register(&[&format!("tcp://0.0.0.0:{port}")])).contains("overlaps"));
    // The session works after all those refusals: it receives its connection.
    let client = std::thread::spawn(move || get(port, "x", "/A/x"));
    match s.recv() {
        Some((Message::Connection { id, meta }, Some(fd))) => {
            assert_eq!(meta.route, format!("http://:{port}/A"));
            s.send(&Message::Ack { id });
            drop(fd);
        }
        other => panic!("expected a connection, got {other:?}"),
    }
    drop(s);
    let _ = client.join();
}

#[test]
fn a_reserved_route_is_refused_to_others_until_it_is_released() {
    let pm = Portmux::start(&["--linger", "1s"]);
    let port = free_port();
    let spec = format!("http://:{port}");
    drop(RawSession::register(pm.control(), "alpha", &[&spec]));
    pm.wait_reserved(&spec);
    let refusal = Service::try_hello(pm.control(), &spec, "beta", &["--name", "beta"]).err().unwrap();
    assert!(refusal.contains("reserved for service 'alpha'"), "{refusal}");
    pm.wait_gone(&spec);
    let _beta = Service::hello(&pm, &spec, "beta", &["--name", "beta"]);
    assert_eq!(get(port, "x", "/").unwrap().body, "beta");
}
