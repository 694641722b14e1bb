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
