//! The config file (TOML, `portmux run --config FILE`). Nothing in it is
//! required; today it holds the `[policy]` (who may claim what).

use super::policy::{Policy, PolicySection};
use serde::Deserialize;
use std::path::Path;

/// The file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default)]
    pub policy: PolicySection,
}

/// Why the config file cannot be used; the text names the file, the line and
/// column where the parser saw the problem, and what to write instead.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read the config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("config file {path}: {message}")]
    Invalid { path: String, message: String },
}

/// Reads and checks `path`; the policy's uid and group names are resolved now.
pub fn load(path: &Path, own_uid: u32) -> Result<Policy, FileError> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Read { path: shown.clone(), source })?;
    parse(&text, own_uid).map_err(|message| FileError::Invalid { path: shown, message })
}

/// Parses a config file's text.
pub fn parse(text: &str, own_uid: u32) -> Result<Policy, String> {
    let file: ConfigFile = toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())?;
    file.policy.build(own_uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_line_and_column() {
        let e = parse("[policy]\n[[policy.rule]]\nports = [8000, true]\n", 0).unwrap_err();
        assert!(e.contains("line 3, column"), "{e}");
        let e = parse("[polcy]\n", 0).unwrap_err();
        assert!(e.contains("unknown field `polcy`") && e.contains("line 1"), "{e}");
        assert!(parse("", 0).is_ok(), "an empty file is the defaults");
    }
}
