//! Routes made at run time (admin API, `portmux route`) kept in the state
//! directory, so that a plain restart brings them back (Caddy's autosave is
//! the model). The file is `routes.json`: written whole to a temporary file,
//! fsynced, renamed over the old one, and the directory fsynced, so a crash
//! leaves the old file or the new one, never half of one. Routes from the
//! config file are not in it (the file says them again at the next start),
//! nor ACME's own challenge route, nor services' routes (services claim
//! theirs again when they reconnect; under systemd the fd store keeps them
//! reserved across a crash).

use super::driver::Control;
use portmux_wire::Handover;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::rc::Rc;

/// The file's name in the state directory.
pub const FILE: &str = "routes.json";
const VERSION: u32 = 1;

/// The file as written.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Saved {
    version: u32,
    routes: Vec<SavedRoute>,
}

/// One route with backends (or a redirect: no backends).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedRoute {
    pub route: String,
    #[serde(default)]
    pub backends: Vec<String>,
}

/// Why the file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} is not a route state portmux wrote: {reason}")]
    Corrupt { path: String, reason: String },
}

/// The state file of one state directory, and what was written last.
#[derive(Debug)]
pub struct RouteFile {
    path: PathBuf,
    last: Option<String>,
}

impl RouteFile {
    pub fn new(dir: &Path) -> RouteFile {
        RouteFile { path: dir.join(FILE), last: None }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The routes kept, or none if there is no file yet.
    pub fn load(&mut self) -> Result<Vec<SavedRoute>, LoadError> {
        let shown = || self.path.display().to_string();
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(LoadError::Read { path: shown(), source }),
        };
        let saved: Saved =
            serde_json::from_str(&text).map_err(|e| LoadError::Corrupt { path: shown(), reason: e.to_string() })?;
        if saved.version != VERSION {
            let reason = format!("version {} (this portmux writes version {VERSION})", saved.version);
            return Err(LoadError::Corrupt { path: shown(), reason });
        }
        self.last = Some(text);
        Ok(saved.routes)
    }

    /// Moves an unusable file aside (`routes.json.bad-UNIXTIME`) for
    /// inspection, so the next write does not replace it; returns where.
    pub fn set_aside(&self) -> std::io::Result<PathBuf> {
        let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let aside = self.path.with_file_name(format!("{FILE}.bad-{secs}"));
        std::fs::rename(&self.path, &aside)?;
        Ok(aside)
    }

    /// Starting without the file's routes (`--no-resume`): it stays as it is
    /// until the routes first change.
    pub fn untouched(mut self) -> RouteFile {
        self.last = render(Vec::new()).ok();
        self
    }

    /// Replaces the file with `routes`, atomically, if they changed.
    pub fn save(&mut self, routes: Vec<SavedRoute>) -> std::io::Result<()> {
        let text = render(routes)?;
        if self.last.as_deref() == Some(text.as_str()) {
            return Ok(());
        }
        let tmp = self.path.with_file_name(format!(".{FILE}.tmp"));
        let write = || -> std::io::Result<()> {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            if let Some(dir) = self.path.parent() {
                std::fs::File::open(dir)?.sync_all()?;
            }
            Ok(())
        };
        let result = write();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        } else {
            self.last = Some(text);
        }
        result
    }
}

fn render(routes: Vec<SavedRoute>) -> std::io::Result<String> {
    let mut text = serde_json::to_string_pretty(&Saved { version: VERSION, routes }).map_err(std::io::Error::other)?;
    text.push('\n');
    Ok(text)
}

impl Control {
    /// Keeps the routes in `file` (in systemd's fd store) from now on.
    pub fn keep_state_in(&self, file: crate::systemd::StateFile) {
        *self.state_file.borrow_mut() = Some(file);
    }

    /// Whether the routes are kept in a file in the fd store.
    pub fn keeps_state(&self) -> bool {
        self.state_file.borrow().is_some()
    }

    /// Keeps the routes in the fd store (under systemd).
    pub(super) fn persist(&self) {
        if let Some(file) = self.state_file.borrow_mut().as_mut() {
            let core = self.core.borrow();
            let routes: Vec<_> = core
                .route_messages(std::time::Instant::now())
                .into_iter()
                .chain(self.file_routes_message(&core))
                .collect();
            drop(core);
            if let Err(e) = file.write(&routes) {
                tracing::warn!("cannot keep the route state in the fd store: {e}");
            }
        }
    }

    /// Keeps the run-time routes in `file` from now on.
    pub fn save_routes_in(&self, file: RouteFile) {
        *self.saved.borrow_mut() = Some(file);
    }

    /// Reads the routes kept in the state directory and recreates them. An
    /// unusable file is reported, set aside, and portmux starts without it.
    pub fn resume(self: &Rc<Self>, mut file: RouteFile) {
        match file.load() {
            Ok(routes) if routes.is_empty() => {}
            Ok(routes) => {
                let n = routes.len();
                let msgs = routes.into_iter().map(|r| Handover::BackendRoute { route: r.route, backends: r.backends });
                let restored = self.restore_from(msgs.collect(), "the state directory");
                tracing::info!(file = %file.path().display(), "{restored} of {n} saved routes restored (--no-resume starts without them)");
            }
            Err(e) => match file.set_aside() {
                Ok(aside) => tracing::error!("{e}; kept as {} and starting without it", aside.display()),
                Err(e2) => tracing::error!("{e}; cannot set it aside ({e2}), starting without it"),
            },
        }
        self.save_routes_in(file);
    }

    /// Writes the run-time routes to the state directory, if it keeps them.
    pub(super) fn save_routes(&self) {
        let mut saved = self.saved.borrow_mut();
        let Some(file) = saved.as_mut() else { return };
        if !matches!(self.mode(), super::core::Mode::Serving) {
            return; // Frozen or handed over: the state is (or will be) the next process's.
        }
        let from_file = self.file_routes.borrow();
        let routes = self
            .core
            .borrow()
            .routes()
            .iter()
            .filter(|(key, r)| {
                let automatic = r.spec.acme && r.spec.scheme == portmux_wire::spec::Scheme::Http;
                !from_file.contains(*key) && !automatic
            })
            .filter_map(|(_, r)| match &r.target {
                super::core::RouteTarget::Backends(pool) => Some(SavedRoute {
                    route: r.spec.to_string(),
                    backends: pool.backends.iter().map(|b| b.spec.to_string()).collect(),
                }),
                super::core::RouteTarget::Service(_) => None,
            })
            .collect();
        if let Err(e) = file.save(routes) {
            tracing::warn!(file = %file.path().display(), "cannot save the routes: {e}; they will not survive a restart");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_atomically_and_loads_back() {
        let dir = std::env::temp_dir().join(format!("portmux-saved-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut f = RouteFile::new(&dir);
        assert!(f.load().unwrap().is_empty(), "no file: no routes");
        let routes = vec![SavedRoute { route: "tcp://:9000".into(), backends: vec!["127.0.0.1:1@2".into()] }];
        f.save(routes.clone()).unwrap();
        assert_eq!(RouteFile::new(&dir).load().unwrap(), routes);
        assert!(!dir.join(format!(".{FILE}.tmp")).exists());
        std::fs::write(dir.join(FILE), "{\"version\": 1, \"routes\": [{\"rout\": 1}]}").unwrap();
        let e = RouteFile::new(&dir).load().unwrap_err().to_string();
        assert!(e.contains("routes.json") && e.contains("unknown field `rout`"), "{e}");
        let aside = RouteFile::new(&dir).set_aside().unwrap();
        assert!(aside.exists() && !dir.join(FILE).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
