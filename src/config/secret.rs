//! Secrets (the admin token): never printed, compared in constant time,
//! zeroed when dropped.

/// A secret read from a file (the admin token): compared in constant time,
/// never printed, zeroed when dropped.
pub struct Secret(zeroize::Zeroizing<Vec<u8>>);

impl Secret {
    pub fn new(bytes: Vec<u8>) -> Secret {
        Secret(zeroize::Zeroizing::new(bytes))
    }

    /// Reads the token file: its first line, without surrounding whitespace.
    pub fn from_file(path: &std::path::Path) -> Result<Secret, String> {
        let raw = zeroize::Zeroizing::new(
            std::fs::read(path).map_err(|e| format!("cannot read the admin token file {}: {e}", path.display()))?,
        );
        let line = raw.split(|b| *b == b'\n').next().unwrap_or_default().trim_ascii();
        if line.len() < 16 {
            return Err(format!(
                "the admin token in {} is shorter than 16 characters; write a long random one (e.g. `openssl rand -hex 32 > {}`)",
                path.display(),
                path.display()
            ));
        }
        Ok(Secret(zeroize::Zeroizing::new(line.to_vec())))
    }

    /// Whether `given` is the secret (in time independent of where they differ).
    pub fn matches(&self, given: &[u8]) -> bool {
        let a: &[u8] = &self.0;
        a.len() == given.len() && a.iter().zip(given).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}
