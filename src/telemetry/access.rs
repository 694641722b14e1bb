//! The access log: one line per connection, and one per request the
//! per-request engine answers, as text or JSON, to stdout or a file. Lines
//! are made where the connection or request ends and written by a thread of
//! their own (the workers never wait on the disk); SIGUSR1 reopens the file
//! for logrotate.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

/// How lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Format {
    /// One readable line: time client route -> target outcome status bytes duration.
    #[default]
    Human,
    /// One JSON object per line.
    Json,
}

/// Where lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Stdout,
    File(PathBuf),
}

impl Destination {
    /// `-` is stdout, anything else a file path (made absolute: SIGUSR1
    /// reopens it wherever portmux's working directory is then).
    pub fn parse(s: &str) -> Destination {
        match s {
            "-" => Destination::Stdout,
            _ => Destination::File(std::path::absolute(s).unwrap_or_else(|_| PathBuf::from(s))),
        }
    }
}

/// One connection or request, as the log shows it.
#[derive(Debug, Clone)]
pub struct Entry<'a> {
    pub client: SocketAddr,
    /// The route's canonical spec ("" when none matched).
    pub route: &'a str,
    /// `service NAME`, `backend ADDR`, or `portmux` (it answered itself).
    pub target: &'a str,
    pub outcome: &'a str,
    /// The HTTP status, when there was one.
    pub status: Option<u16>,
    /// `METHOD host/path` of a request.
    pub request: Option<(&'a str, &'a str, &'a str)>,
    pub from_client: u64,
    pub to_client: u64,
    pub started: Instant,
}

enum Line {
    Text(String),
    Reopen,
    /// Portmux is ending: write what came before, then stop.
    End,
}

/// The access log, if one is configured; cheap to check when it is off.
#[derive(Debug)]
pub struct AccessLog {
    format: Format,
    lines: Option<mpsc::SyncSender<Line>>,
    /// The writer's side until [`AccessLog::start`] gives it a thread.
    writer: std::sync::Mutex<Option<(Output, mpsc::Receiver<Line>, Destination)>>,
    /// The writer's thread, joined at the end so no line is lost.
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    /// SIGUSR1 came while the backlog was full: the writer reopens after its batch.
    reopen: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Lines dropped because the writer fell behind.
    pub dropped: AtomicU64,
}

impl std::fmt::Debug for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Line::Text(_) => "Text",
            Line::Reopen => "Reopen",
            Line::End => "End",
        })
    }
}

/// Lines waiting for the writer at most; past that they are dropped and counted.
const BACKLOG: usize = 65_536;

impl AccessLog {
    /// No access log.
    pub fn off() -> AccessLog {
        AccessLog {
            format: Format::Human,
            lines: None,
            writer: Default::default(),
            thread: Default::default(),
            reopen: Default::default(),
            dropped: AtomicU64::new(0),
        }
    }

    /// Opens `to` (a file is created or appended to); lines wait until
    /// [`AccessLog::start`] (the sandbox wants a single thread when it is applied).
    pub fn open(to: Destination, format: Format) -> std::io::Result<AccessLog> {
        let out = Output::open(&to)?;
        let (tx, rx) = mpsc::sync_channel::<Line>(BACKLOG);
        let writer = std::sync::Mutex::new(Some((out, rx, to)));
        Ok(AccessLog { format, lines: Some(tx), writer, ..AccessLog::off() })
    }

    /// Starts the thread that writes the lines.
    pub fn start(&self) -> std::io::Result<()> {
        let Some((mut out, rx, to)) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return Ok(());
        };
        let reopen = self.reopen.clone();
        let thread = std::thread::Builder::new().name("portmux-access-log".into()).spawn(move || {
            while let Ok(line) = rx.recv() {
                let mut end = out.take(line, &to);
                // Everything queued now, then one flush.
                while let (false, Ok(line)) = (end, rx.try_recv()) {
                    end = out.take(line, &to);
                }
                out.flush();
                if reopen.swap(false, Ordering::Relaxed) {
                    out.take(Line::Reopen, &to);
                }
                if end {
                    return;
                }
            }
            out.flush();
        })?;
        *self.thread.lock().unwrap_or_else(|p| p.into_inner()) = Some(thread);
        Ok(())
    }

    /// Writes what is queued and stops the writer (at most `within`).
    pub fn close(&self, within: Duration) {
        let (Some(lines), Some(thread)) = (&self.lines, self.thread.lock().unwrap_or_else(|p| p.into_inner()).take())
        else {
            return;
        };
        if lines.send(Line::End).is_ok() {
            let deadline = Instant::now() + within;
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    pub fn is_on(&self) -> bool {
        self.lines.is_some()
    }

    /// Logs `e` (if the log is on).
    pub fn write(&self, e: &Entry<'_>) {
        let Some(lines) = &self.lines else { return };
        let text = match self.format {
            Format::Human => human(e),
            Format::Json => json(e),
        };
        if lines.try_send(Line::Text(text)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Reopens the file (after logrotate moved it); never waits.
    pub fn reopen(&self) {
        if let Some(lines) = &self.lines
            && lines.try_send(Line::Reopen).is_err()
        {
            self.reopen.store(true, Ordering::Relaxed);
        }
    }
}

struct Output(Box<dyn Write + Send>);

impl std::fmt::Debug for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Output")
    }
}

impl Output {
    fn open(to: &Destination) -> std::io::Result<Output> {
        Ok(Output(match to {
            Destination::Stdout => Box::new(std::io::BufWriter::new(std::io::stdout())),
            Destination::File(path) => {
                let file = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| {
                    std::io::Error::new(e.kind(), format!("cannot open the access log {}: {e}", path.display()))
                })?;
                Box::new(std::io::BufWriter::new(file))
            }
        }))
    }

    /// Takes one line; true at the end.
    fn take(&mut self, line: Line, to: &Destination) -> bool {
        match line {
            Line::Text(text) => {
                let _ = self.0.write_all(text.as_bytes());
            }
            Line::Reopen => {
                self.flush();
                match Output::open(to) {
                    Ok(fresh) => {
                        *self = fresh;
                        tracing::info!("the access log is reopened");
                    }
                    Err(e) => tracing::warn!("{e}; the access log goes on in the old file"),
                }
            }
            Line::End => return true,
        }
        false
    }

    fn flush(&mut self) {
        let _ = self.0.flush();
    }
}

fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn human(e: &Entry<'_>) -> String {
    let time = humantime::format_rfc3339_millis(SystemTime::now());
    let route = if e.route.is_empty() { "-" } else { e.route };
    let request = e.request.map(|(m, h, p)| format!(" \"{m} {h}{p}\"")).unwrap_or_default();
    let status = e.status.map_or_else(|| "-".to_string(), |s| s.to_string());
    format!(
        "{time} {client} {route}{request} -> {target} {outcome} {status} {from}/{to} {ms}ms\n",
        client = e.client,
        target = e.target,
        outcome = e.outcome,
        from = e.from_client,
        to = e.to_client,
        ms = millis(e.started.elapsed()),
    )
}

fn json(e: &Entry<'_>) -> String {
    let mut v = serde_json::json!({
        "time": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
        "client": e.client.to_string(),
        "route": e.route,
        "target": e.target,
        "outcome": e.outcome,
        "status": e.status,
        "bytes_from_client": e.from_client,
        "bytes_to_client": e.to_client,
        "duration_ms": millis(e.started.elapsed()),
    });
    if let Some((method, host, path)) = e.request {
        v["method"] = method.into();
        v["host"] = host.into();
        v["path"] = path.into();
    }
    let mut line = v.to_string();
    line.push('\n');
    line
}
