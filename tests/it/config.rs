//! What operators configure and what survives them: routes made at run time
//! kept across restarts, the config file, reloads.

use crate::util::*;
use std::time::Duration;

fn backends_of(pm: &Portmux, route: &str) -> Vec<String> {
    let view = pm.route(route).unwrap_or_else(|| panic!("{route} is not a route: {:?}", pm.routes()));
    match view.target {
        portmux::admin::TargetView::Backends { backends, .. } => backends
            .into_iter()
            .map(|b| if b.weight == 1 { b.addr } else { format!("{}@{}", b.addr, b.weight) })
            .collect(),
        other => panic!("{route} has no backends: {other:?}"),
    }
}

#[test]
fn routes_added_at_run_time_survive_a_restart_and_a_corrupt_state_file_is_set_aside() {
    let dir = TempDir::new();
    let control = dir.path().join("control.sock");
    let state = dir.path().join("state");
    let (_a, a) = Service::backend("a", &[]);
    let (_b, b) = Service::backend("b", &[]);
    let (port, tcp_port) = (free_port(), free_port());
    let route = format!("http://saved.test:{port}");
    let tcp = format!("tcp://127.0.0.1:{tcp_port}?lb=least_conn");
    let mut pm = Portmux::start_at(&control, &[], None).unwrap();
    let (ok, _, err) = portmux_cli(&pm, &["route", "add", &route, "--backend", &format!("{a}@3,{b}")]);
    assert!(ok, "{err}");
    let (ok, _, err) = portmux_cli(&pm, &["route", "add", &tcp, "--backend", &a.to_string()]);
    assert!(ok, "{err}");
    let saved = std::fs::read_to_string(state.join("routes.json")).expect("the routes are saved at once");
    assert!(saved.contains(&format!("{a}@3")), "{saved}");
    assert_eq!(exit_text(pm.terminate(Duration::from_secs(10))), "exit code 0");

    // A plain restart: both routes are back, with their weights and options.
    let mut pm = Portmux::start_at(&control, &[], None).unwrap();
    assert_eq!(backends_of(&pm, &route), vec![format!("{a}@3"), b.to_string()]);
    assert_eq!(backends_of(&pm, &tcp), vec![a.to_string()]);
    assert!(pm.route(&tcp).unwrap().route.contains("lb=least_conn"));
    let bodies: Vec<String> = (0..4).map(|_| get(port, "saved.test", "/").unwrap().body).collect();
    assert_eq!(bodies.iter().filter(|b| *b == "a").count(), 3, "weights survive: {bodies:?}");
    // A removal is saved too.
    let (ok, _, err) = portmux_cli(&pm, &["route", "remove", &tcp]);
    assert!(ok, "{err}");
    assert_eq!(exit_text(pm.terminate(Duration::from_secs(10))), "exit code 0");

    // --no-resume starts empty (and leaves the file until the next change).
    let mut pm = Portmux::start_at(&control, &["--no-resume"], None).unwrap();
    assert!(pm.routes().is_empty(), "{:?}", pm.routes());
    assert_eq!(exit_text(pm.terminate(Duration::from_secs(10))), "exit code 0");
    let pm = Portmux::start_at(&control, &[], None).unwrap();
    assert_eq!(pm.routes().len(), 1, "the removed route stays removed: {:?}", pm.routes());
    drop(pm);

    // A corrupt file: reported with its path and reason, kept aside, portmux serves without it.
    std::fs::write(state.join("routes.json"), "{\"version\": 1, \"routes\": [{\"route\": 7}]}").unwrap();
    let pm = Portmux::start_at(&control, &[], None).unwrap();
    assert!(pm.routes().is_empty());
    let log = pm.log();
    assert!(
        log.contains(&format!("{} is not a route state portmux wrote", state.join("routes.json").display())),
        "{log}"
    );
    let aside: Vec<_> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("routes.json.bad-"))
        .collect();
    assert_eq!(aside.len(), 1, "{aside:?}");
    assert!(std::fs::read_to_string(state.join(&aside[0])).unwrap().contains("\"route\": 7"));
    // The next change writes a good file again.
    let (ok, _, err) = portmux_cli(&pm, &["route", "add", &route, "--backend", &a.to_string()]);
    assert!(ok, "{err}");
    assert!(std::fs::read_to_string(state.join("routes.json")).unwrap().contains(&route));
}

fn limit(pm: &Portmux, flag: &str) -> u64 {
    pm.status().limits.iter().find(|l| l.flag == flag).map(|l| l.limit).unwrap_or_else(|| panic!("no {flag}"))
}

fn header<'a>(r: &'a Response, name: &str) -> Option<&'a str> {
    r.head.lines().find_map(|l| l.split_once(':').filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim()))
}

#[test]
fn a_toml_file_declares_settings_routes_and_redirects_and_check_names_each_problem_by_line() {
    let dir = TempDir::new();
    let (_a, a) = Service::backend("a", &[]);
    let port = free_port();
    let file = dir.path().join("portmux.toml");
    std::fs::write(
        &file,
        format!(
            r#"# settings are portmux run's flags
[run]
via = true
max-parked = 5
max-sessions = 7

[[route]]
spec = "http://app.test:{port}"
backends = ["{a}"]

[[route]]
spec = "http://old.test:{port}"
redirect = {{ url = "https://new.test/base", status = 301 }}

[[route]]
spec = "http://gone.test:{port}"
redirect = {{ url = "https://elsewhere.test/", discard-path = true, status = 302 }}
"#
        ),
    )
    .unwrap();
    let (ok, out, err) = run_cli(&["check", "--config", file.to_str().unwrap()]);
    assert!(ok && out.contains("OK") && out.contains("3 routes"), "{out}{err}");
    // Flags win over the file's settings.
    let pm = Portmux::start(&["--config", file.to_str().unwrap(), "--max-sessions", "9"]);
    assert_eq!((limit(&pm, "--max-parked"), limit(&pm, "--max-sessions")), (5, 9));
    let r = get(port, "app.test", "/x").unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "a"));
    assert_eq!(header(&r, "via"), Some("1.1 portmux"), "{}", r.head);
    let r = get(port, "old.test", "/a/b?c=1").unwrap();
    assert_eq!((r.status, header(&r, "location")), (301, Some("https://new.test/base/a/b?c=1")), "{}", r.head);
    let r = get(port, "gone.test", "/a/b?c=1").unwrap();
    assert_eq!((r.status, header(&r, "location")), (302, Some("https://elsewhere.test/")), "{}", r.head);
    // The file's routes are not saved as run-time routes (the file says them again).
    let (ok, _, err) =
        portmux_cli(&pm, &["route", "add", &format!("http://runtime.test:{port}"), "--backend", &a.to_string()]);
    assert!(ok, "{err}");
    let saved = std::fs::read_to_string(pm.control().with_file_name("state").join("routes.json")).unwrap();
    assert!(saved.contains("runtime.test") && !saved.contains("app.test") && !saved.contains("old.test"), "{saved}");

    // Each problem, with its line and column and what to write.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[run]\npeek-timeout = \"soon\"\nmax_parked = 3\n\n[[route]]\nspec = \"http://x.test?lb=fast\"\nbackends = [\"127.0.0.1:1\"]\n",
    )
    .unwrap();
    let (ok, _, err) = run_cli(&["check", "--config", bad.to_str().unwrap()]);
    assert!(!ok, "{err}");
    assert!(err.contains("line 2, column 16: setting `peek-timeout`"), "{err}");
    assert!(err.contains("line 3, column 14: unknown setting `max_parked`; write `max-parked`"), "{err}");
    assert!(err.contains("line 6, column 8:") && err.contains("use lb=round_robin or lb=least_conn"), "{err}");
    // And portmux does not start on it.
    let (ok, _, err) = run_cli(&["run", "--config", bad.to_str().unwrap(), "--control", "/nonexistent/c.sock"]);
    assert!(!ok && err.contains("line 2, column 16"), "{err}");
    // A route named twice once the default bind is known: refused at start.
    let dup = dir.path().join("dup.toml");
    let twice = |extra: &str| format!("[[route]]\nspec = \"http://dup.test:{port}{extra}\"\nbackends = [\"{a}\"]\n");
    std::fs::write(&dup, twice("") + &twice("?bind=127.0.0.1")).unwrap();
    let args = ["run", "--config", dup.to_str().unwrap(), "--bind", "127.0.0.1", "--control", "/nonexistent/c.sock"];
    let (ok, _, err) = run_cli(&args);
    assert!(
        !ok && err.contains("line 5, column 8:")
            && err.contains("is the route of line 2 too (the default bind is 127.0.0.1); merge"),
        "{err}"
    );
}

/// `portmux ARGS…` without a running portmux: (success, stdout, stderr).
fn run_cli(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portmux")).args(args).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Keep-alive GETs from `clients` threads until `stop`, at most `max` each: (ok, failed, bodies seen).
fn load(
    port: u16,
    host: &'static str,
    clients: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Vec<std::thread::JoinHandle<(usize, Vec<String>)>> {
    (0..clients)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0, Vec::new());
                let mut http = Http::connect(port);
                let deadline = std::time::Instant::now() + Duration::from_secs(60);
                while !stop.load(std::sync::atomic::Ordering::Relaxed)
                    && ok < 200_000
                    && std::time::Instant::now() < deadline
                {
                    match http.get(host, "/") {
                        Ok(r) if r.status == 200 => ok += 1,
                        Ok(r) => failed.push(format!("{} {}", r.status, r.body)),
                        Err(e) => {
                            failed.push(e.to_string());
                            http = Http::connect(port);
                        }
                    }
                }
                (ok, failed)
            })
        })
        .collect()
}

#[test]
fn a_reload_under_load_applies_the_difference_and_a_bad_file_changes_nothing() {
    let dir = TempDir::new();
    let (_a, a) = Service::backend("a", &[]);
    let (_b, b) = Service::backend("b", &[]);
    let port = free_port();
    let file = dir.path().join("portmux.toml");
    let write = |routes: &str| std::fs::write(&file, routes).unwrap();
    let route =
        |host: &str, backends: &str| format!("[[route]]\nspec = \"http://{host}:{port}\"\nbackends = [{backends}]\n\n");
    write(&(route("", &format!("\"{a}\"")) + &route("old.test", &format!("\"{a}\""))));
    let pm = Portmux::start(&["--config", file.to_str().unwrap()]);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients = load(port, "app.test", 2, stop.clone());
    pm.wait_for("requests flowing", |pm| {
        pm.route(&format!("http://:{port}")).is_some() && get(port, "app.test", "/").is_ok_and(|r| r.status == 200)
    });

    let wrk = crate::graceful::wrk(port, 4, false);
    // Add a backend and a route, remove a route: through `portmux reload`.
    write(&(route("", &format!("\"{a}\", \"{b}\"")) + &route("new.test", &format!("\"{b}\""))));
    let (ok, out, err) = portmux_cli(&pm, &["reload"]);
    assert!(ok, "{err}");
    assert!(out.contains("1 added, 1 changed, 1 removed"), "{out}");
    assert_eq!(get(port, "new.test", "/").unwrap().body, "b");
    assert!(pm.route(&format!("http://old.test:{port}")).is_none(), "the removed route is gone");
    let bodies: Vec<String> = (0..4).map(|_| get(port, "app.test", "/").unwrap().body).collect();
    assert!(bodies.contains(&"b".to_string()), "the new backend serves: {bodies:?}");

    // A bad file: refused with its line, the running configuration stays.
    write(
        &(route("", &format!("\"{a}\""))
            + "[[route]]\nspec = \"http://broken.test:99999\"\nbackends = [\"127.0.0.1:1\"]\n"),
    );
    let (ok, _, err) = portmux_cli(&pm, &["reload"]);
    assert!(!ok && err.contains("line 6, column 8") && err.contains("the running configuration stays"), "{err}");
    assert_eq!(backends_of(&pm, &format!("http://:{port}")).len(), 2);
    assert_eq!(get(port, "new.test", "/").unwrap().body, "b");

    // A route a service holds is never taken by a reload; SIGHUP reloads too.
    let svc_port = free_port();
    let _svc = Service::hello(&pm, &format!("http://svc.test:{svc_port}"), "service", &[]);
    write(
        &(route("", &format!("\"{b}\""))
            + &format!("[[route]]\nspec = \"http://svc.test:{svc_port}\"\nbackends = [\"{a}\"]\n")),
    );
    let (ok, _, err) = portmux_cli(&pm, &["reload"]);
    assert!(!ok && err.contains("is held by service"), "{err}");
    write(&route("", &format!("\"{b}\"")));
    pm.signal(rustix::process::Signal::HUP);
    pm.wait_for("SIGHUP applied the file", |pm| backends_of(pm, &format!("http://:{port}")) == vec![b.to_string()]);
    assert_eq!(get(svc_port, "svc.test", "/").unwrap().body, "service", "the service keeps its route");

    let served = crate::graceful::stop(wrk).unwrap_or_else(|e| panic!("wrk saw failures across the reloads: {e}"));
    assert!(served > 0);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for c in clients {
        let (ok, failed) = c.join().unwrap();
        assert!(failed.is_empty(), "requests failed during reloads: {failed:?}");
        total += ok;
    }
    assert!(total > 0);
}

/// SRP's README example, with this test's backends and ports, read unchanged.
#[test]
fn an_srp_config_file_works_unchanged() {
    let dir = TempDir::new();
    let (_a, a) = Service::backend("www", &[]);
    let (_b, b) = Service::backend("www", &[]);
    let port = free_port();
    let file = dir.path().join("config.json");
    std::fs::write(
        &file,
        format!(
            r#"{{
	"Services": {{
		"www.example.com": {{
			"HealthPath": "/health",
			"Backends": [
				"{a}",
				"{b}"
			]
		}},
		"example.com": {{
			"Redirect": {{
				"URL": "https://www.example.com",
				"DiscardPath": true,
				"Permanent": true
			}}
		}}
	}},
	"API": {{
		"Subnet": "10.128.0.0/24"
	}}
}}"#
        ),
    )
    .unwrap();
    let (ok, out, err) = run_cli(&["check", "--config", file.to_str().unwrap(), "--http-port", &port.to_string()]);
    assert!(ok && out.contains("Srp"), "{out}{err}");
    let pm = Portmux::start(&["--config", file.to_str().unwrap(), "--http-port", &port.to_string()]);
    assert_eq!(get(port, "www.example.com", "/").unwrap().body, "www");
    let r = get(port, "example.com", "/some/path").unwrap();
    assert_eq!((r.status, header(&r, "location")), (301, Some("https://www.example.com")), "{}", r.head);
    let routes = pm.routes();
    let route = routes.iter().find(|r| r.route.starts_with("http://www.example.com")).expect("the SRP host is a route");
    assert!(route.route.contains("health=/health"), "{}", route.route);
    // /services answers only inside API.Subnet: this client (127.0.0.1) is outside.
    let r = get(port, "www.example.com", "/services").unwrap();
    assert_eq!(r.status, 403, "{}{}", r.head, r.body);
}

#[test]
fn services_lists_the_healthy_backends_inside_the_subnet_only() {
    let dir = TempDir::new();
    let (_a, a) = Service::backend("a", &[]);
    let (port, dead) = (free_port(), free_port());
    let file = dir.path().join("portmux.toml");
    let write = |subnet: &str| {
        std::fs::write(
            &file,
            format!(
                "[api]\nsubnets = [\"{subnet}\"]\n\n[[route]]\nspec = \"http://api.internal:{port}\"\n\
                 backends = [\"{a}\", \"127.0.0.1:{dead}\"]\nhealth = {{ path = \"/health\", interval = \"100ms\" }}\n"
            ),
        )
        .unwrap()
    };
    write("127.0.0.0/8");
    let pm = Portmux::start(&["--config", file.to_str().unwrap()]);
    let route = format!("http://api.internal:{port}");
    pm.wait_for("the dead backend out", |pm| !healthy(pm, &route)[1].1);
    // On a kept-alive connection too (the per-request engine answers it).
    let mut http = Http::connect(port);
    assert_eq!(http.get("api.internal", "/").unwrap().body, "a");
    let r = http.get("anything.test", "/services").unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(header(&r, "content-type").is_some_and(|c| c.contains("json")));
    let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v, serde_json::json!({ "api.internal": { "HealthPath": "/health", "Backends": [a.to_string()] } }));
    // Outside the subnet (after a reload that moves it): 403.
    write("10.0.0.0/8");
    let (ok, _, err) = portmux_cli(&pm, &["reload"]);
    assert!(ok, "{err}");
    assert_eq!(get(port, "api.internal", "/services").unwrap().status, 403);
}

fn healthy(pm: &Portmux, route: &str) -> Vec<(String, bool, u64)> {
    let routes = pm.routes();
    let view = routes.iter().find(|r| r.route.starts_with(route)).unwrap_or_else(|| panic!("no {route}"));
    match &view.target {
        portmux::admin::TargetView::Backends { backends, .. } => {
            backends.iter().map(|b| (b.addr.clone(), b.healthy, b.connections)).collect()
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn health_checks_take_a_dead_backend_out_and_bring_it_back_under_load_with_no_failed_request() {
    let dir = TempDir::new();
    let (a_port, port) = (free_port(), free_port());
    let (a, a_addr) = Service::backend_on(&format!("127.0.0.1:{a_port}"), "a", &[]);
    let (_b, b_addr) = Service::backend("b", &[]);
    let file = dir.path().join("portmux.toml");
    std::fs::write(
        &file,
        format!(
            "[[route]]\nspec = \"http://hc.test:{port}\"\nbackends = [\"{a_addr}\", \"{b_addr}\"]\n\
             health = {{ path = \"/health\", interval = \"100ms\", timeout = \"1s\", rise = 2 }}\n"
        ),
    )
    .unwrap();
    let pm = Portmux::start(&["--config", file.to_str().unwrap()]);
    let route = format!("http://hc.test:{port}");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients = load(port, "hc.test", 4, stop.clone());
    pm.wait_for("both backends serving", |pm| healthy(pm, &route).iter().all(|(_, up, n)| *up && *n > 0));

    // a dies: the checks take it out; requests keep succeeding on b.
    let mut a = a;
    a.kill();
    pm.wait_for("a out of the rotation", |pm| !healthy(pm, &route)[0].1);
    assert!(healthy(&pm, &route)[1].1, "b stays in");
    // a comes back where it was: two passing checks bring it back, and it serves again.
    let (_a, _) = Service::backend_on(&format!("127.0.0.1:{a_port}"), "a", &[]);
    let before = healthy(&pm, &route)[0].2;
    pm.wait_for("a back and serving", |pm| healthy(pm, &route)[0].1 && healthy(pm, &route)[0].2 > before);

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in clients {
        let (ok, failed) = c.join().unwrap();
        assert!(failed.is_empty(), "requests failed while a backend died and came back: {failed:?}");
        assert!(ok > 0);
    }
}

#[test]
fn sigterm_stops_accepting_and_lets_requests_and_relays_in_flight_finish_within_drain() {
    use std::io::{Read, Write};
    // A backend that takes its time over one answer.
    let (slow, _) = spawn_backend(|mut s| {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while whole_request(&buf).is_none() {
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        std::thread::sleep(Duration::from_millis(1500));
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow");
    });
    let echo = TestBackend::start("echo", false);
    let (http_port, tcp_port) = (free_port(), free_port());
    let mut pm = Portmux::start(&["--drain", "20s"]);
    for (spec, backend) in
        [(format!("http://slow.test:{http_port}"), slow), (format!("tcp://127.0.0.1:{tcp_port}"), echo.addr)]
    {
        let (ok, _, err) = portmux_cli(&pm, &["route", "add", &spec, "--backend", &backend.to_string()]);
        assert!(ok, "{err}");
    }
    let (mut relay, greeting) = greeted(tcp_port);
    assert_eq!(greeting, "echo");
    let mut request = Http::connect(http_port);
    write!(request.stream, "GET / HTTP/1.1\r\nHost: slow.test\r\n\r\n").unwrap();
    pm.wait_for("the request in flight", |pm| pm.status().connections >= 2);
    let stopped_at = std::time::Instant::now();
    pm.signal(rustix::process::Signal::TERM);
    // The request in flight gets its whole answer, after the old 1 s grace.
    let r = read_response(&mut request.stream).unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "slow"));
    // The relay still carries bytes both ways; new connections are not served.
    relay.write_all(b"still here\n").unwrap();
    let mut echoed = [0u8; 11];
    relay.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed, b"still here\n");
    let refused = std::net::TcpStream::connect(("127.0.0.1", http_port)).map_err(|e| e.kind());
    assert_eq!(refused.err(), Some(std::io::ErrorKind::ConnectionRefused), "a stopping portmux refuses new clients");
    assert!(pm.is_running(), "still draining");
    // Once the last connection ends, portmux exits at once, well before --drain.
    drop(relay);
    drop(request);
    assert_eq!(exit_text(pm.terminate(Duration::from_secs(10))), "exit code 0");
    assert!(stopped_at.elapsed() < Duration::from_secs(15), "{:?}\n{}", stopped_at.elapsed(), pm.log());
}

#[test]
fn retries_hide_a_backend_that_drops_requests_for_get_never_resend_a_post_and_stay_within_the_budget() {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    // Reads each request and answers (`good`) or closes without a word.
    let backend = |answer: bool, seen: Arc<Mutex<Vec<String>>>| {
        spawn_backend(move |mut s| {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                while whole_request(&buf).is_none() {
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let (head, len) = whole_request(&buf).unwrap();
                buf.drain(..len);
                seen.lock().unwrap().push(head.split(' ').next().unwrap_or_default().to_string());
                if !answer {
                    return;
                }
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
            }
        })
        .0
    };
    let (bad_seen, good_seen) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new())));
    let (bad, good) = (backend(false, bad_seen.clone()), backend(true, good_seen.clone()));
    let port = free_port();
    // No cooldown: the dropping backend stays in the rotation, so every request may meet it.
    let pm = Portmux::start(&["--backend-cooldown", "1ms"]);
    let (ok, _, err) = portmux_cli(
        &pm,
        &["route", "add", &format!("http://retry.test:{port}"), "--backend", &format!("{bad},{good}")],
    );
    assert!(ok, "{err}");
    let count = |seen: &Arc<Mutex<Vec<String>>>, m: &str| seen.lock().unwrap().iter().filter(|x| *x == m).count();
    // GETs: every one answered, the dropped ones by the other backend.
    for i in 0..8 {
        let r = get(port, "retry.test", &format!("/{i}")).unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "ok"), "GET {i}");
    }
    assert!(count(&bad_seen, "GET") > 0, "the dropping backend was met");
    // POSTs that reached the dropping backend are not sent again: 502, and each POST arrives once.
    let failed = AtomicUsize::new(0);
    for i in 0..8 {
        let mut http = Http::connect(port);
        write!(http.stream, "POST /{i} HTTP/1.1\r\nHost: retry.test\r\nContent-Length: 2\r\n\r\nhi").unwrap();
        match read_response(&mut http.stream).unwrap().status {
            200 => {}
            502 => {
                failed.fetch_add(1, Ordering::Relaxed);
            }
            s => panic!("POST {i}: {s}"),
        }
    }
    let (bad_posts, good_posts) = (count(&bad_seen, "POST"), count(&good_seen, "POST"));
    assert!(bad_posts > 0, "a POST met the dropping backend");
    assert_eq!(bad_posts + good_posts, 8, "each POST reached one backend once");
    assert_eq!(failed.load(Ordering::Relaxed), bad_posts, "a POST the backend dropped is a 502, never resent");
    // The budget: retries stay within ten plus a fifth of the requests, however many fail.
    let mut refused = 0;
    for i in 0..100 {
        let r = get(port, "retry.test", &format!("/b{i}")).unwrap();
        if r.status == 502 {
            refused += 1;
        }
    }
    let requests = 8 + 8 + 100;
    // Each GET the backend dropped was retried on the other, unless the budget refused (a 502).
    let retries = count(&bad_seen, "GET") - refused;
    assert!(refused > 0, "the budget ran out");
    assert!(retries <= 10 + requests / 5 + 1, "{retries} retries for {requests} requests");
}

/// (pid, passes its health check) of each instance of the route starting with `route`.
fn instances_health(pm: &Portmux, route: &str) -> Vec<(i32, bool)> {
    let routes = pm.routes();
    let Some(view) = routes.iter().find(|r| r.route.starts_with(route)) else { return Vec::new() };
    match &view.target {
        portmux::admin::TargetView::Service { instances, .. } => instances.iter().map(|i| (i.pid, i.healthy)).collect(),
        other => panic!("{other:?}"),
    }
}

/// The bodies of `n` requests, each on a new connection.
fn bodies(port: u16, host: &str, n: usize) -> Vec<(u16, String)> {
    (0..n).map(|_| get(port, host, "/").map(|r| (r.status, r.body)).expect("a request failed")).collect()
}

#[test]
fn a_service_declares_a_health_path_and_an_instance_failing_it_leaves_the_rotation_until_it_passes() {
    let dir = TempDir::new();
    let port = free_port();
    let pm = Portmux::start(&[]);
    let route = format!("http://svc.test:{port}");
    let spec = format!("{route}/?health=/healthz&health_interval=100ms&health_timeout=1s&health_fall=2&health_rise=2");
    let (a_down, b_down) = (dir.path().join("a-down"), dir.path().join("b-down"));
    let a = Service::hello(&pm, &spec, "A", &["--name", "app", "--down-file", a_down.to_str().unwrap()]);
    let b = Service::hello(&pm, &spec, "B", &["--name", "app", "--down-file", b_down.to_str().unwrap()]);
    let (a_pid, b_pid) = (a.pid() as i32, b.pid() as i32);
    let health_of = |pm: &Portmux, pid: i32| instances_health(pm, &route).iter().find(|i| i.0 == pid).map(|i| i.1);
    pm.wait_for("both instances registered and healthy", |pm| {
        health_of(pm, a_pid) == Some(true) && health_of(pm, b_pid) == Some(true)
    });
    let seen = bodies(port, "svc.test", 20);
    assert!(seen.contains(&(200, "A".into())) && seen.contains(&(200, "B".into())), "round robin: {seen:?}");

    // B starts failing its check: two failures take it out, and every client goes to A.
    std::fs::write(&b_down, "").unwrap();
    pm.wait_for("B out of the rotation", |pm| health_of(pm, b_pid) == Some(false));
    assert_eq!(health_of(&pm, a_pid), Some(true), "A keeps passing");
    let seen = bodies(port, "svc.test", 20);
    assert!(seen.iter().all(|r| *r == (200, "A".into())), "B is out of the rotation: {seen:?}");
    let (ok, listed, _) = portmux_cli(&pm, &["route", "list"]);
    assert!(ok && listed.contains("1 failing its health check"), "route list shows it:\n{listed}");

    // Every instance failing: all of them serve (as with backends), none is queued.
    std::fs::write(&a_down, "").unwrap();
    pm.wait_for("A out too", |pm| health_of(pm, a_pid) == Some(false));
    let seen = bodies(port, "svc.test", 4);
    assert!(seen.iter().all(|r| *r == (503, "down\n".into())), "the services themselves answer: {seen:?}");

    // B recovers: two passes bring it back, and it alone serves while A fails.
    std::fs::remove_file(&b_down).unwrap();
    pm.wait_for("B back in the rotation", |pm| health_of(pm, b_pid) == Some(true));
    let seen = bodies(port, "svc.test", 20);
    assert!(seen.iter().all(|r| *r == (200, "B".into())), "only B passes: {seen:?}");
    // The checks' connections were all acked or taken back: none is left unacked.
    pm.wait_for("no unacked check connections", |pm| {
        pm.routes().iter().all(|r| match &r.target {
            portmux::admin::TargetView::Service { instances, .. } => instances.iter().all(|i| i.unacked == 0),
            _ => true,
        })
    });

    // A newer instance with another check: the route takes its check (a rolling deploy).
    let newer = format!("{route}/?health=/ready&health_interval=100ms");
    let _c = Service::hello(&pm, &newer, "C", &["--name", "app"]);
    pm.wait_for("the newer check", |pm| pm.routes().iter().any(|r| r.route.contains("health=/ready")));
    assert_eq!(instances_health(&pm, &route).len(), 3);

    // A service may not declare a check portmux cannot make.
    let tcp = Service::try_hello(pm.control(), &format!("tcp://127.0.0.1:{}?health=/h", free_port()), "x", &[]);
    let err = tcp.err().expect("a health check on a tcp:// service route is refused");
    assert!(err.contains("claim health=/PATH on an http:// or https:// route"), "{err}");
    let tcp_check = Service::try_hello(pm.control(), &format!("http://other.test:{port}/?health=tcp"), "x", &[]);
    let err = tcp_check.err().expect("health=tcp on a service route is refused");
    assert!(err.contains("a service's route takes health=/PATH"), "{err}");
}

#[test]
fn an_upgrade_rereads_the_config_file_and_removes_the_routes_it_no_longer_declares() {
    let dir = TempDir::new();
    let (_a, a) = Service::backend("a", &[]);
    let (kept, dropped, added, runtime) = (free_port(), free_port(), free_port(), free_port());
    let file = dir.path().join("portmux.toml");
    let route = |host: &str, port: u16| format!("[[route]]\nspec = \"http://{host}:{port}\"\nbackends = [\"{a}\"]\n");
    std::fs::write(&file, route("kept.test", kept) + &route("dropped.test", dropped)).unwrap();
    let mut pm = Portmux::start(&["--config", file.to_str().unwrap()]);
    let made_at_run_time = format!("http://runtime.test:{runtime}");
    let (ok, _, err) = portmux_cli(&pm, &["route", "add", &made_at_run_time, "--backend", &a.to_string()]);
    assert!(ok, "{err}");
    let shown = |pm: &Portmux| {
        let mut r: Vec<String> = pm.routes().into_iter().map(|r| r.route).collect();
        r.sort();
        r
    };

    // The file drops a route and declares a new one; the upgrade applies both.
    std::fs::write(&file, route("kept.test", kept) + &route("added.test", added)).unwrap();
    pm.upgrade(&[]).unwrap();
    let mut want =
        vec![format!("http://added.test:{added}"), format!("http://kept.test:{kept}"), made_at_run_time.clone()];
    want.sort();
    assert_eq!(shown(&pm), want);
    assert_eq!(get(added, "added.test", "/").unwrap().body, "a");
    // Its port lingers a while (--linger), with no route: 404.
    assert_eq!(get(dropped, "dropped.test", "/").map(|r| r.status).ok(), Some(404));
    // Only the run-time route is saved, and it survives a second upgrade with the file's routes.
    let state = pm.control().parent().unwrap().join("state").join("routes.json");
    let saved = std::fs::read_to_string(&state).unwrap();
    assert!(
        saved.contains("runtime.test") && !saved.contains("dropped.test") && !saved.contains("kept.test"),
        "{saved}"
    );
    std::fs::write(&file, route("kept.test", kept)).unwrap();
    pm.upgrade(&[]).unwrap();
    want.retain(|r| !r.contains("added.test"));
    assert_eq!(shown(&pm), want, "the second process knew added.test was the file's");
    let saved = std::fs::read_to_string(&state).unwrap();
    assert!(saved.contains("runtime.test") && !saved.contains("added.test"), "{saved}");
}

#[test]
fn health_checks_of_a_proxy_route_open_with_a_proxy_header() {
    use std::io::{Read, Write};
    // A backend that serves only connections opening with a PROXY header.
    let (backend, conns) = spawn_backend(|mut s| {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        if buf.starts_with(b"PROXY TCP4 127.0.0.1 127.0.0.1 ") {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nConnection: close\r\n\r\nproxied");
        }
    });
    let port = free_port();
    let pm = Portmux::start(&[]);
    let route = format!("http://px.test:{port}?proxy=v1&health=/h&health_interval=50ms&health_fall=1");
    let (ok, _, err) = portmux_cli(&pm, &["route", "add", &route, "--backend", &backend.to_string()]);
    assert!(ok, "{err}");
    pm.wait_for("three checks", |_| conns.load(std::sync::atomic::Ordering::Relaxed) >= 3);
    let r = get(port, "px.test", "/").unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "proxied"));
    assert!(healthy(&pm, "http://px.test").iter().all(|(_, up, _)| *up), "{}", pm.log());
}
