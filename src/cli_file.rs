//! The config file's `[run]` settings as `portmux run` flags: each is checked
//! by the flag's own parser (so the file takes exactly what the command line
//! takes, with the same messages), and flags given on the command line (or
//! through their environment variable) win over the file.

use crate::{Cli, Command};
use clap::{CommandFactory, FromArgMatches, parser::ValueSource};
use portmux::config::file::{self, Config, Context, FileError, Format, Problem};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Settings the file cannot hold: they say where the file is.
const NOT_IN_FILE: [&str; 2] = ["config", "config-format"];

/// The config file to read: `--config`, else the default path if it exists.
pub fn path_of(given: Option<&Path>) -> Option<PathBuf> {
    given.map(Path::to_path_buf).or_else(|| Some(PathBuf::from(file::DEFAULT_PATH)).filter(|p| p.exists()))
}

/// Parses `format` as `--config-format` takes it.
pub fn parse_format(s: &str) -> Result<Format, String> {
    match s {
        "toml" => Ok(Format::Toml),
        "srp" => Ok(Format::Srp),
        _ => Err(format!("'{s}' is not a config format; use toml or srp (the default: told by the content)")),
    }
}

/// The command line with the file's settings put in front of the flags the
/// user gave (those the user gave are left out): `argv` as `portmux run` gets it.
pub fn merged_argv(argv: &[OsString], config: &Config, path: &Path) -> Result<Vec<OsString>, FileError> {
    let run = Cli::command().find_subcommand("run").cloned().expect("run is a subcommand");
    let given = run.clone().try_get_matches_from(argv_after_run(argv)).ok();
    let mut problems = Vec::new();
    let mut extra: Vec<OsString> = Vec::new();
    for s in &config.settings {
        let Some(arg) = run.get_arguments().find(|a| a.get_long() == Some(s.key.as_str())) else {
            let message = match s.key.replace('_', "-") {
                k if k != s.key && run.get_arguments().any(|a| a.get_long() == Some(k.as_str())) => {
                    format!("unknown setting `{}`; write `{k}` (the flag's name without its dashes)", s.key)
                }
                _ => format!(
                    "unknown setting `{}`; [run] takes `portmux run`'s flags without their dashes (portmux run --help)",
                    s.key
                ),
            };
            problems.push(Problem { at: s.at, message });
            continue;
        };
        if NOT_IN_FILE.contains(&s.key.as_str()) {
            let message = format!("`{}` belongs on the command line, not in the file it names", s.key);
            problems.push(Problem { at: s.at, message });
            continue;
        }
        let id = arg.get_id().as_str();
        let source = given.as_ref().and_then(|m| m.value_source(id));
        if matches!(source, Some(ValueSource::CommandLine | ValueSource::EnvVariable)) {
            continue; // The command line wins.
        }
        let takes_value = arg.get_action().takes_values();
        let mut flag: Vec<OsString> = Vec::new();
        match (takes_value, s.values.as_slice()) {
            (false, []) => flag.push(format!("--{}", s.key).into()),
            (false, [v]) if v == "false" => {}
            (false, _) => {
                let message = format!("setting `{}` is a switch; write `{} = true` (or leave it out)", s.key, s.key);
                problems.push(Problem { at: s.at, message });
                continue;
            }
            (true, []) => {
                let message = format!("setting `{}` needs a value, not `true`", s.key);
                problems.push(Problem { at: s.at, message });
                continue;
            }
            (true, values) => {
                for v in values {
                    flag.push(format!("--{}", s.key).into());
                    flag.push(v.into());
                }
            }
        }
        // Checked alone, so the problem is this setting's and has its line.
        let alone = std::iter::once(OsString::from("run")).chain(flag.iter().cloned());
        if let Err(e) = run.clone().try_get_matches_from(alone) {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default().trim_start_matches("error: ");
            problems.push(Problem { at: s.at, message: format!("setting `{}`: {first}", s.key) });
            continue;
        }
        extra.extend(flag);
    }
    if !problems.is_empty() {
        return Err(FileError::Invalid { path: path.display().to_string(), problems });
    }
    let at = argv.iter().position(|a| a == "run").map_or(argv.len(), |i| i + 1);
    let mut out = argv[..at].to_vec();
    out.extend(extra);
    out.extend_from_slice(&argv[at..]);
    Ok(out)
}

fn argv_after_run(argv: &[OsString]) -> Vec<OsString> {
    let at = argv.iter().position(|a| a == "run").unwrap_or(0);
    argv[at..].to_vec()
}

/// `portmux run` with the config file's settings: the command line to run with
/// (unchanged when there is no file) and the file, checked.
pub fn resolve(
    argv: Vec<OsString>,
    given: Option<&Path>,
    format: Option<Format>,
    cx: Context,
) -> Result<(crate::RunArgs, Option<(PathBuf, Config)>), String> {
    let Some(path) = path_of(given) else {
        return Ok((run_args(&argv)?, None));
    };
    let config = match file::load(&path, format, cx) {
        Ok(config) => config,
        Err(FileError::Invalid { path: shown, mut problems }) => {
            // The settings' problems too, all in one report.
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let settings = Config { settings: file::settings_only(&text), ..Config::empty(cx.own_uid) };
            if let Err(FileError::Invalid { problems: more, .. }) = merged_argv(&argv, &settings, &path) {
                problems.extend(more);
            }
            problems.sort_by_key(|p| (p.at.line, p.at.column));
            return Err(FileError::Invalid { path: shown, problems }.to_string());
        }
        Err(e) => return Err(e.to_string()),
    };
    let merged = merged_argv(&argv, &config, &path).map_err(|e| e.to_string())?;
    let args = run_args(&merged)?;
    Ok((args, Some((path, config))))
}

fn run_args(argv: &[OsString]) -> Result<crate::RunArgs, String> {
    let matches = Cli::command().try_get_matches_from(argv).map_err(|e| e.to_string())?;
    match Cli::from_arg_matches(&matches).map_err(|e| e.to_string())?.command {
        Command::Run(args) => Ok(*args),
        _ => Err("not portmux run".into()),
    }
}
