//! The control plane: owns listeners, service sessions, routes and queued
//! connections; serves the control socket; publishes route tables to workers.
//!
//! - [`core`]: every decision, without I/O: inputs in (with the time), effects out;
//! - [`driver`]: owns the core and the sockets it names, carries out its effects;
//! - `session`: one service's control session (the protocol);
//! - `parking`: the sockets of connections the core holds, and hang-up watches;
//! - `health`: the active health checks routes ask for;
//! - `idle`: connections services give back between requests;
//! - [`views`]: what the admin API shows;
//! - [`handover`]: the state's way to a new process (upgrades) and back from
//!   the fd store (crashes);
//! - [`reload`]: the config file read again, its difference applied;
//! - [`saved`]: what survives a restart: the fd store, and the run-time
//!   routes' file in the state directory;
//! - [`error`]: why something was refused, typed.

pub mod acme;
pub mod certs;
pub mod core;
pub mod driver;
pub mod error;
pub mod handover;
mod health;
mod idle;
mod parking;
pub mod reload;
pub mod saved;
mod session;
pub mod views;

pub use driver::{Control, Exit, Lifecycle, Sockets, UpgradeRequest};
pub use error::{ControlError, HandoverError, Kind};
pub use handover::{Frozen, Importer, Outgoing};
