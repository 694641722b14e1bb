//! What `portmux status`, `portmux routes` and `portmux route list` print:
//! one renderer for the routes (a line each, with its counts beneath), and
//! the process's state above them for `status`.

use portmux::admin::{RouteView, StatusView, TargetView};

/// The routes, each with its counts: what `route list`, `routes` and `status` show.
pub fn routes(views: &[RouteView]) -> String {
    if views.is_empty() {
        return "no routes\n".into();
    }
    let mut out = String::new();
    for v in views {
        out += &describe(v);
        out.push('\n');
        if let Some(c) = &v.counts {
            let open = match &v.target {
                TargetView::Backends { backends, .. } => {
                    format!("{} open, ", backends.iter().map(|b| b.active).sum::<usize>())
                }
                TargetView::Service { queued, .. } => format!("{queued} waiting, "),
            };
            out += &format!(
                "    {open}handed off {}, parked {}, forwarded {}, per-request {}, answered {}, refused {}, dropped {}",
                c.handed_off, c.parked, c.forwarded, c.engine, c.answered, c.refused, c.dropped
            );
            let [_, ok, moved, client, server] = c.requests;
            if c.requests.iter().any(|n| *n > 0) {
                out += &format!("; requests 2xx {ok}, 3xx {moved}, 4xx {client}, 5xx {server}");
            }
            if c.bytes_from_clients + c.bytes_to_clients > 0 {
                out += &format!("; bytes in {}, out {}", c.bytes_from_clients, c.bytes_to_clients);
            }
            out.push('\n');
        }
    }
    out
}

/// The process, its listeners, its routes and the limits that refused something.
pub fn status(s: &StatusView, views: &[RouteView]) -> String {
    let uptime = humantime::format_duration(std::time::Duration::from_secs(s.uptime_s));
    let upgrades = match s.upgrades {
        0 => String::new(),
        1 => ", after 1 upgrade".into(),
        n => format!(", after {n} upgrades"),
    };
    let mut out = format!("portmux {} (pid {}): {} for {uptime}{upgrades}\n", s.version, s.pid, s.state);
    if let Some(c) = &s.control {
        out += &format!("control socket: {c}\n");
    }
    out += &format!(
        "connections: {} open ({} being peeked at, {} idle between requests), {} parked; {} service sessions\n",
        s.connections, s.peeking, s.idle, s.queued, s.sessions
    );
    out += &format!("sandbox: {}\n", s.sandbox.as_deref().unwrap_or("off"));
    if !s.relay.is_empty() {
        out += &format!("relay: {} ({} flows in the kernel, {} in user space)\n", s.relay, s.relayed.0, s.relayed.1);
    }
    out += &format!("listeners ({}):\n", s.listeners.len());
    for l in &s.listeners {
        let pinned = if l.pinned { ", from systemd" } else { "" };
        out += &format!("  {}  {} route(s){pinned}\n", l.addr, l.routes);
    }
    out += &format!("routes ({}):\n", views.len());
    for line in routes(views).lines() {
        out += &format!("  {line}\n");
    }
    let hit: Vec<String> = s
        .limits
        .iter()
        .filter(|l| l.hits > 0)
        .map(|l| format!("{} ({} {}): {}", l.name, l.flag, l.limit, l.hits))
        .collect();
    if !hit.is_empty() {
        out += &format!("limits hit: {}\n", hit.join(", "));
    }
    out
}

/// One line per route: where it listens and where its connections go.
pub fn describe(v: &RouteView) -> String {
    let target = match &v.target {
        TargetView::Service { service, instances, queued, half_closed, reserved_for_s, lent } => {
            let mut t = format!("service '{service}', {} instance(s)", instances.len());
            let who: Vec<String> = instances
                .iter()
                .map(|i| {
                    let state = if i.draining {
                        ", draining"
                    } else if !i.healthy {
                        ", failing"
                    } else if i.lent {
                        ", accepts itself"
                    } else {
                        ""
                    };
                    format!("pid {} uid {}{state}", i.pid, i.uid)
                })
                .collect();
            if !who.is_empty() {
                t += &format!(" [{}]", who.join("; "));
            }
            let down = instances.iter().filter(|i| !i.healthy).count();
            if down > 0 {
                t += &format!(" ({down} failing its health check)");
            }
            if *queued > 0 {
                t += &format!(", {queued} queued");
            }
            if *half_closed > 0 {
                t += &format!(" ({half_closed} half-closed)");
            }
            if let Some(s) = reserved_for_s {
                t += &format!(", reserved for {s}s more");
            }
            if *lent {
                t += ", port lent (its connections are not counted by portmux)";
            }
            t
        }
        TargetView::Backends { policy, proxy, backends } => {
            let list: Vec<String> = backends
                .iter()
                .map(|b| {
                    let weight = if b.weight == 1 { String::new() } else { format!("@{}", b.weight) };
                    let health = if b.healthy { "up" } else { "down" };
                    format!("{}{weight} ({health}, {} active)", b.addr, b.active)
                })
                .collect();
            let proxy = proxy.as_ref().map(|p| format!(", PROXY {p}")).unwrap_or_default();
            format!("{policy}{proxy} -> {}", list.join(", "))
        }
    };
    format!("{}  on {}  {}", v.route, v.listen, target)
}
