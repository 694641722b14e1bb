//! Session-ticket keys shared by every worker: tickets are sealed with the
//! newest key (ChaCha20-Poly1305), opened with it or the one before, rotated
//! on a schedule, and handed to the next process on an upgrade so clients
//! resume across it.

use arc_swap::ArcSwap;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

const NAME_LEN: usize = 16;
const KEY_LEN: usize = 32;
/// A key as handed over: its name, then the key.
pub const EXPORTED_LEN: usize = NAME_LEN + KEY_LEN;

struct Key {
    name: [u8; NAME_LEN],
    raw: Zeroizing<[u8; KEY_LEN]>,
    sealing: LessSafeKey,
}

impl Key {
    fn from_parts(name: [u8; NAME_LEN], raw: Zeroizing<[u8; KEY_LEN]>) -> Option<Key> {
        let sealing = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, raw.as_ref()).ok()?);
        Some(Key { name, raw, sealing })
    }

    fn random(rng: &SystemRandom) -> Option<Key> {
        let mut name = [0u8; NAME_LEN];
        let mut raw = Zeroizing::new([0u8; KEY_LEN]);
        rng.fill(&mut name).ok()?;
        rng.fill(raw.as_mut()).ok()?;
        Key::from_parts(name, raw)
    }
}

struct Keys {
    current: Key,
    previous: Option<Key>,
    made: Instant,
}

/// The ticket keys; see the module documentation.
pub struct Tickets {
    keys: ArcSwap<Keys>,
    rotation: Duration,
    rotating: Mutex<()>,
    rng: SystemRandom,
}

impl std::fmt::Debug for Tickets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tickets").field("rotation", &self.rotation).finish_non_exhaustive()
    }
}

impl Tickets {
    /// Fresh keys, rotated every `rotation`.
    pub fn new(rotation: Duration) -> Option<Tickets> {
        let rng = SystemRandom::new();
        let current = Key::random(&rng)?;
        let keys = Keys { current, previous: None, made: Instant::now() };
        Some(Tickets { keys: ArcSwap::from_pointee(keys), rotation, rotating: Mutex::new(()), rng })
    }

    /// The keys, newest first, and how long ago the newest was made.
    pub fn export(&self) -> (Vec<Zeroizing<Vec<u8>>>, Duration) {
        let keys = self.keys.load();
        let one = |k: &Key| {
            let mut v = Zeroizing::new(Vec::with_capacity(EXPORTED_LEN));
            v.extend_from_slice(&k.name);
            v.extend_from_slice(k.raw.as_ref());
            v
        };
        let mut out = vec![one(&keys.current)];
        out.extend(keys.previous.as_ref().map(one));
        (out, keys.made.elapsed())
    }

    /// Takes over the previous process's keys (newest first); false if they are malformed.
    pub fn import(&self, exported: &[Vec<u8>], age: Duration) -> bool {
        let parse = |v: &Vec<u8>| -> Option<Key> {
            if v.len() != EXPORTED_LEN {
                return None;
            }
            let name: [u8; NAME_LEN] = v[..NAME_LEN].try_into().ok()?;
            let mut raw = Zeroizing::new([0u8; KEY_LEN]);
            raw.copy_from_slice(&v[NAME_LEN..]);
            Key::from_parts(name, raw)
        };
        let Some(current) = exported.first().and_then(parse) else { return false };
        let previous = exported.get(1).and_then(parse);
        let made = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
        self.keys.store(Arc::new(Keys { current, previous, made }));
        true
    }

    /// Makes a new key when the current one is due, keeping the current as the previous.
    fn rotate_if_due(&self) {
        if self.keys.load().made.elapsed() < self.rotation {
            return;
        }
        let Ok(_one) = self.rotating.try_lock() else { return };
        let keys = self.keys.load_full();
        if keys.made.elapsed() < self.rotation {
            return;
        }
        let Some(current) = Key::random(&self.rng) else { return };
        let previous = Key::from_parts(keys.current.name, keys.current.raw.clone());
        self.keys.store(Arc::new(Keys { current, previous, made: Instant::now() }));
        tracing::debug!("session-ticket key rotated");
    }
}

impl rustls::server::ProducesTickets for Tickets {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        u32::try_from(self.rotation.as_secs()).unwrap_or(u32::MAX)
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.rotate_if_due();
        let keys = self.keys.load();
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(NAME_LEN + NONCE_LEN + plain.len() + 16);
        out.extend_from_slice(&keys.current.name);
        out.extend_from_slice(&nonce);
        let mut sealed = plain.to_vec();
        let aad = Aad::from(keys.current.name);
        keys.current.sealing.seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), aad, &mut sealed).ok()?;
        out.extend_from_slice(&sealed);
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        if cipher.len() < NAME_LEN + NONCE_LEN {
            return None;
        }
        let (name, rest) = cipher.split_at(NAME_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let keys = self.keys.load();
        let key = [Some(&keys.current), keys.previous.as_ref()].into_iter().flatten().find(|k| k.name == name)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut buf = sealed.to_vec();
        let plain = key.sealing.open_in_place(nonce, Aad::from(key.name), &mut buf).ok()?;
        Some(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::server::ProducesTickets;

    #[test]
    fn tickets_open_with_the_same_keys_only_and_survive_an_export() {
        let a = Tickets::new(Duration::from_secs(3600)).unwrap();
        let sealed = a.encrypt(b"session state").unwrap();
        assert_eq!(a.decrypt(&sealed).unwrap(), b"session state");
        let mut bent = sealed.clone();
        *bent.last_mut().unwrap() ^= 1;
        assert!(a.decrypt(&bent).is_none(), "a changed ticket is refused");

        let b = Tickets::new(Duration::from_secs(3600)).unwrap();
        assert!(b.decrypt(&sealed).is_none(), "other keys do not open it");
        let (keys, age) = a.export();
        let keys: Vec<Vec<u8>> = keys.iter().map(|k| k.to_vec()).collect();
        assert!(b.import(&keys, age));
        assert_eq!(b.decrypt(&sealed).unwrap(), b"session state", "the next process opens it");
        assert!(!b.import(&[vec![1, 2, 3]], age), "malformed keys are refused");
    }

    #[test]
    fn rotation_keeps_the_previous_key() {
        let t = Tickets::new(Duration::ZERO).unwrap();
        let first = t.encrypt(b"one").unwrap();
        let second = t.encrypt(b"two").unwrap(); // rotated before sealing
        assert_ne!(first[..NAME_LEN], second[..NAME_LEN], "a new key seals after the rotation");
        assert_eq!(t.decrypt(&first).unwrap(), b"one", "the previous key still opens");
        t.encrypt(b"three").unwrap();
        assert!(t.decrypt(&first).is_none(), "a key two rotations old is gone");
        assert_eq!(t.export().0.len(), 2);
    }
}
