//! What an operator sees: `portmux status` and `routes`, the Prometheus
//! metrics, the access log (both formats, reopened on SIGUSR1), the man page
//! and completions.

use crate::util::*;
use std::time::Duration;

/// The value of the sample `name{labels}` in a text exposition (labels as written there).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The access log's lines, once at least `n` are there (10 s at most).
fn lines(file: &std::path::Path, n: usize) -> Vec<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        if lines.len() >= n || std::time::Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn status_metrics_and_the_access_log_show_what_flows_and_what_failed() {
    let dir = TempDir::new();
    let log = dir.path().join("access.log");
    let certs = dir.path().to_str().unwrap();
    let mut pm =
        Portmux::start(&["--access-log", log.to_str().unwrap(), "--access-log-format", "json", "--cert-dir", certs]);
    let (svc_port, fwd_port) = (free_port(), free_port());
    let app = Service::hello(&pm, &format!("http://app.test:{svc_port}"), "A", &["--name", "app"]);
    let (_b, b) = Service::backend("b", &[]);
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap(); // closed again: refuses
    for (host, backend) in [("fwd.test", b.to_string()), ("dead.test", dead.to_string())] {
        let (ok, _, err) =
            portmux_cli(&pm, &["route", "add", &format!("http://{host}:{fwd_port}"), "--backend", &backend]);
        assert!(ok, "{err}");
    }
    let (cert, key) = Pki::new(dir.path()).leaf("tls.test");
    let tls_route = format!("https://tls.test:{}?cert={cert}&key={key}", free_port());
    let (ok, _, err) = portmux_cli(&pm, &["route", "add", &tls_route, "--backend", &b.to_string()]);
    assert!(ok, "{err}");
    for _ in 0..3 {
        assert_eq!(get(svc_port, "app.test", "/x").unwrap().body, "A");
        assert_eq!(get(fwd_port, "fwd.test", "/y?z=1").unwrap().body, "b");
    }
    assert_eq!(get(fwd_port, "dead.test", "/").unwrap().status, 502);
    assert_eq!(get(fwd_port, "nowhere.test", "/").unwrap().status, 404);

    // Each is counted once its fate is decided (a moment after the client's answer, maybe).
    let counts = |pm: &Portmux, route: &str| pm.route(route).and_then(|r| r.counts).unwrap_or_default();
    pm.wait_for("the counts", |pm| {
        counts(pm, &format!("http://app.test:{svc_port}")).handed_off == 3
            && counts(pm, &format!("http://fwd.test:{fwd_port}")).requests[1] == 3
            && counts(pm, &format!("http://dead.test:{fwd_port}")).requests[4] == 1
    });
    // status, both ways: the process, its listener, the service's owner and the counts.
    let (ok, text, err) = portmux_cli(&pm, &["status"]);
    assert!(ok, "{err}");
    assert!(
        text.starts_with(&format!("portmux {} (pid {}): serving for", env!("CARGO_PKG_VERSION"), pm.pid())),
        "{text}"
    );
    assert!(text.contains(&format!("127.0.0.1:{svc_port}  1 route(s)")), "{text}");
    assert!(text.contains(&format!("service 'app', 1 instance(s) [pid {} uid 0]", app.pid())), "{text}");
    assert!(text.contains("0 waiting, handed off 3, parked 0"), "{text}");
    assert!(text.contains("requests 2xx 3, 3xx 0, 4xx 0, 5xx 0"), "{text}");
    let (ok, json, err) = portmux_cli(&pm, &["status", "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["status"]["pid"], pm.pid());
    let route = |name: &str| v["routes"].as_array().unwrap().iter().find(|r| r["route"] == name).cloned().unwrap();
    assert_eq!(route(&format!("http://app.test:{svc_port}"))["counts"]["handed_off"], 3);
    assert_eq!(route(&format!("http://dead.test:{fwd_port}"))["counts"]["requests"][4], 1, "the 502");
    let (ok, listed, _) = portmux_cli(&pm, &["routes"]);
    assert!(ok && listed.contains(&format!("{b} (up, 0 active)")) && listed.contains("handed off 3"), "{listed}");

    // The metrics: every family, and counters that moved with the traffic and the faults.
    let (status, m) = admin(pm.admin(), "GET", "/metrics", None);
    assert_eq!(status, 200, "{m}");
    let app_route = format!("http://app.test:{svc_port}");
    let handed = format!("portmux_connections_total{{route=\"{app_route}\",outcome=\"handed_off\"}}");
    assert_eq!(sample(&m, &handed), Some(3.0), "{m}");
    let ok_requests = format!("portmux_http_requests_total{{route=\"http://fwd.test:{fwd_port}\",class=\"2xx\"}}");
    assert_eq!(sample(&m, &ok_requests), Some(3.0), "{m}");
    let failed = format!("portmux_http_requests_total{{route=\"http://dead.test:{fwd_port}\",class=\"5xx\"}}");
    assert_eq!(sample(&m, &failed), Some(1.0), "{m}");
    let no_route = "portmux_connections_total{route=\"\",outcome=\"refused\"}";
    assert_eq!(sample(&m, no_route), Some(1.0), "the 404: {m}");
    let accepted = format!("portmux_accepted_connections_total{{listener=\"127.0.0.1:{svc_port}\"}}");
    assert_eq!(sample(&m, &accepted), Some(3.0), "{m}");
    let to_clients =
        format!("portmux_relayed_bytes_total{{route=\"http://fwd.test:{fwd_port}\",direction=\"to_client\"}}");
    assert!(sample(&m, &to_clients).unwrap_or(0.0) > 0.0, "{m}");
    assert!(sample(&m, "portmux_handoff_duration_seconds_count").unwrap_or(0.0) >= 3.0, "{m}");
    assert!(sample(&m, "portmux_errors_total{side=\"backend\"}").unwrap_or(0.0) >= 1.0, "the dead backend: {m}");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as f64;
    let expiry = m.lines().find(|l| l.starts_with("portmux_certificate_expiry_timestamp_seconds{"));
    let expiry: f64 = expiry.and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(0.0);
    assert!(expiry > now, "the certificate's expiry ({expiry}) is ahead: {m}");
    for family in [
        "portmux_peek_duration_seconds_bucket",
        "portmux_errors_total{side=\"service\"} 0",
        "portmux_limit{limit=",
        "portmux_limit_hits_total{limit=",
        "portmux_upgrades_total 0",
        "portmux_upgrade_duration_seconds_count 0",
        "portmux_certificate_expiry_timestamp_seconds{route=\"https://tls.test:",
        "portmux_open_connections",
        "portmux_sessions 1",
        "portmux_build_info{version=",
        "# UNIT portmux_handoff_duration_seconds seconds",
        "portmux_access_log_dropped_lines_total 0",
        "# EOF",
    ] {
        assert!(m.contains(family), "{family} is missing:\n{m}");
    }

    // A removed route's series go with it.
    let (ok, _, err) = portmux_cli(&pm, &["route", "remove", &format!("http://dead.test:{fwd_port}")]);
    assert!(ok, "{err}");
    let (_, m) = admin(pm.admin(), "GET", "/metrics", None);
    assert!(!m.contains("dead.test") && m.contains("fwd.test"), "{m}");

    // The access log: a JSON object per connection and per request, with the fields.
    let entries: Vec<serde_json::Value> = lines(&log, 8).iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    let handed: Vec<_> = entries.iter().filter(|e| e["outcome"] == "handed_off").collect();
    assert_eq!(handed.len(), 3, "{entries:?}");
    assert_eq!(handed[0]["route"], app_route.as_str());
    assert_eq!(handed[0]["target"], format!("service app pid {}", app.pid()).as_str());
    assert!(handed[0]["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    let requests: Vec<_> = entries.iter().filter(|e| e["outcome"] == "request").collect();
    let fwd = requests.iter().find(|e| e["host"] == "fwd.test").expect("a request line");
    assert_eq!(
        (fwd["method"].as_str(), fwd["path"].as_str(), fwd["status"].as_u64()),
        (Some("GET"), Some("/y?z=1"), Some(200))
    );
    assert_eq!(fwd["target"], format!("backend {b}").as_str());
    assert!(fwd["bytes_to_client"].as_u64().unwrap() > 0 && fwd["duration_ms"].as_f64().is_some(), "{fwd}");
    assert!(requests.iter().any(|e| e["host"] == "dead.test" && e["status"] == 502), "{requests:?}");

    // logrotate moves the file; SIGUSR1 makes portmux write a new one.
    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    pm.signal(rustix::process::Signal::USR1);
    assert!(pm.wait_log("the access log is reopened", Duration::from_secs(10)));
    let mut fresh = Vec::new();
    for _ in 0..100 {
        get(svc_port, "app.test", "/after").unwrap();
        fresh = lines(&log, 0);
        if !fresh.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(fresh.iter().any(|l| l.contains("handed_off")), "{fresh:?}");
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert_eq!(old.lines().count(), entries.len(), "nothing more went to the moved file");

    // An upgrade: counted and timed in the new process, which says so in its status.
    pm.upgrade(&[]).unwrap();
    let (_, m) = admin(pm.admin(), "GET", "/metrics", None);
    assert_eq!(sample(&m, "portmux_upgrades_total"), Some(1.0), "{m}");
    assert_eq!(sample(&m, "portmux_upgrade_duration_seconds_count"), Some(1.0), "{m}");
    let (_, text, _) = portmux_cli(&pm, &["status"]);
    assert!(text.contains("after 1 upgrade"), "{text}");
}

#[test]
fn the_human_access_log_reads_as_one_line_per_connection() {
    let dir = TempDir::new();
    let log = dir.path().join("access.log");
    let pm = Portmux::start(&["--access-log", log.to_str().unwrap()]);
    let port = free_port();
    let app = Service::hello(&pm, &format!("http://h.test:{port}"), "H", &[]);
    assert_eq!(get(port, "h.test", "/").unwrap().body, "H");
    assert_eq!(get(port, "other.test", "/").unwrap().status, 404);
    let got = lines(&log, 2);
    let handed = got.iter().find(|l| l.contains("handed_off")).unwrap_or_else(|| panic!("{got:?}"));
    let words: Vec<&str> = handed.split(' ').collect();
    assert!(words[0].ends_with('Z') && words[1].starts_with("127.0.0.1:"), "{handed}");
    assert_eq!(words[2], format!("http://h.test:{port}"), "{handed}");
    assert!(handed.contains(&format!("-> service hello pid {} handed_off - 0/0 ", app.pid())), "{handed}");
    assert!(handed.ends_with("ms"), "{handed}");
    assert!(got.iter().any(|l| l.contains(" - -> portmux refused 404 ")), "{got:?}");
}

#[test]
fn the_man_page_and_completions_come_from_the_cli_and_the_admin_address_may_be_a_host_name() {
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_portmux")).args(args).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let man = run(&["man"]);
    assert!(man.contains(".TH portmux 1") && man.contains(".TH portmux-status 1"), "{}", &man[..300.min(man.len())]);
    assert!(man.contains("access\\-log"), "the run flags are documented");
    assert!(run(&["completions", "bash"]).contains("_portmux()"));
    assert!(run(&["completions", "zsh"]).contains("#compdef portmux"));

    let admin_port = free_port();
    let pm = Portmux::start(&["--admin", &format!("127.0.0.1:{admin_port}")]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_portmux"))
        .args(["status", "--admin", &format!("localhost:{admin_port}")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(&format!("(pid {})", pm.pid())),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_debian_package_builds_and_installs_a_working_portmux() {
    if std::process::Command::new("dpkg-deb").arg("--version").output().is_err() {
        eprintln!("dpkg-deb is not here: the package is not built");
        return;
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = std::path::Path::new(env!("CARGO_BIN_EXE_portmux")).parent().unwrap().to_path_buf();
    let mut ffi = std::process::Command::new(env!("CARGO"));
    ffi.args(["build", "-p", "portmux-ffi"]);
    if target.ends_with("release") {
        ffi.arg("--release");
    }
    assert!(ffi.status().unwrap().success(), "building libportmux failed");
    let dir = TempDir::new();
    let out = std::process::Command::new(root.join("dist/debian/build-deb"))
        .arg("--from")
        .arg(&target)
        .arg("--out")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "build-deb: {}", String::from_utf8_lossy(&out.stderr));
    let deb = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(deb.ends_with(".deb"), "{deb}");

    // dpkg installs it into a root of its own (never the test machine's /).
    let sysroot = dir.path().join("root");
    for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates"] {
        std::fs::create_dir_all(sysroot.join(d)).unwrap();
    }
    std::fs::write(sysroot.join("var/lib/dpkg/status"), "").unwrap();
    let out = std::process::Command::new("dpkg")
        .arg(format!("--root={}", sysroot.display()))
        .args(["--force-script-chrootless", "--force-depends", "--log=/dev/null", "-i", &deb])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "dpkg -i: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "usr/bin/portmux",
        "lib/systemd/system/portmux.service",
        "lib/systemd/system/portmux.socket",
        "usr/lib/sysusers.d/portmux.conf",
        "usr/share/man/man1/portmux.1.gz",
        "usr/share/bash-completion/completions/portmux",
        "usr/share/zsh/vendor-completions/_portmux",
        "usr/include/portmux.h",
    ] {
        assert!(sysroot.join(f).exists(), "{f} is not installed");
    }
    let lib = std::fs::read_dir(sysroot.join("usr/lib"))
        .unwrap()
        .flatten()
        .find(|e| e.path().join("libportmux.so.0").exists());
    let lib = lib.expect("libportmux.so.0 in the multiarch directory").path();
    let pc = std::fs::read_to_string(lib.join("pkgconfig/portmux.pc")).unwrap();
    assert!(
        pc.contains("prefix=/usr")
            && pc.contains(&format!("libdir=${{prefix}}/lib/{}", lib.file_name().unwrap().to_string_lossy())),
        "{pc}"
    );

    // The installed portmux runs and serves.
    let bin = sysroot.join("usr/bin/portmux");
    let version = std::process::Command::new(&bin).arg("--version").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&version.stdout).trim(), format!("portmux {}", env!("CARGO_PKG_VERSION")));
    let control = dir.path().join("control.sock");
    let mut cmd = std::process::Command::new(&bin);
    cmd.args(["run", "--bind", "127.0.0.1", "--control"]).arg(&control).env_remove("PORTMUX_CONTROL");
    let pm = Portmux::spawn(cmd, &control, None).unwrap();
    let port = free_port();
    let _svc = Service::hello(&pm, &format!("http://deb.test:{port}"), "installed", &[]);
    assert_eq!(get(port, "deb.test", "/").unwrap().body, "installed");
}
