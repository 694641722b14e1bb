//! portmux: many services share ports 80/443 on one host, claim routes on
//! demand over a control socket, and receive their client connections' fds;
//! neither portmux nor the services drop a connection when they restart.
//!
//! Modules in dependency order (each uses only those before it):
//! leaves `ids`, `telemetry` (metrics, the access log), `config`, `systemd`, then `sandbox` (it reads users through `config`) (and the `portmux-sys` and `portmux-wire`
//! crates); mechanisms `reply`, `classify`, `forward`, `handoff`, `tls`,
//! `route`, `l7` (the per-request engine's parts);
//! `shared` (what workers and the control plane share); `accept` (the
//! workers) and `control` (the control plane's core and driver); `admin` and
//! `upgrade`; `runtime`, the one composition root. See `docs/ARCHITECTURE.md`.
#![forbid(unsafe_code)]

pub mod accept;
pub mod admin;
pub mod classify;
pub mod config;
pub mod control;
pub mod forward;
pub mod handoff;
pub mod ids;
pub mod l7;
pub mod reply;
pub mod route;
pub mod runtime;
pub mod sandbox;
pub mod shared;
pub mod systemd;
pub mod telemetry;
pub mod tls;
pub mod upgrade;
