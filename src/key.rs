//! Store keys: what a store keeps a session under, a digest of its id and never the id itself.

use std::fmt;

use crate::id::Id;

/// What a store keeps a session under: the first 128 bits of the BLAKE3 digest of the
/// session's [`Id`].
///
/// The id is the bearer secret that the cookie carries; a key cannot be turned back into it. So
/// a store's contents, a key scan, a backup, a `MONITOR` trace or a proxy's access log of a
/// store's traffic hand out no usable cookie. (Rails and Go's scs store a digest of the id for
/// the same reason.) The layer derives the key once per request that loads or creates a
/// session; stores, the crate's own and custom ones, only ever see keys.
///
/// 128 bits are more than the id's own 122 random bits, so the shorter digest loses nothing,
/// and a key is as small as an id.
///
/// A store writes a key as [`Key::to_hex`] (32 lowercase hex digits) or as its bytes. In errors
/// and logs it names at most the key's [`fingerprint`](Key::fingerprint); `Debug` prints only
/// that.
///
/// # Examples
/// ```
/// use hyper_sessions::store::Key;
/// use hyper_sessions::Id;
///
/// let id = Id::random();
/// let key = Key::of(id);
/// assert_eq!(key, Key::of(id));
/// assert_eq!(key.to_hex().len(), 32);
/// assert!(!key.to_hex().contains(&id.to_string().replace('-', "")));
/// assert!(key.to_hex().starts_with(&key.fingerprint().to_string()));
/// ```
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key([u8; 16]);

/// The length of a key's text form.
pub(crate) const KEY_HEX_LEN: usize = 32;

const HEX: &[u8; 16] = b"0123456789abcdef";

impl Key {
    /// The key of the session with this id.
    pub fn of(id: Id) -> Key {
        let digest = blake3::hash(&id.to_bytes());
        let mut key = [0; 16];
        key.copy_from_slice(&digest.as_bytes()[..16]);
        Key(key)
    }

    /// The key with these bytes, as [`to_bytes`](Key::to_bytes) gave them: for the stores that
    /// read keys back (an owner's listing; the Redis family from its owner indexes).
    /// Crate-private.
    #[cfg(any(
        test,
        feature = "sqlite",
        feature = "postgres",
        feature = "redis",
        feature = "webdis"
    ))]
    pub(crate) fn from_bytes(bytes: [u8; 16]) -> Key {
        Key(bytes)
    }

    /// The key's 16 bytes.
    pub fn to_bytes(self) -> [u8; 16] {
        self.0
    }

    /// The key's text form: 32 lowercase hex digits.
    pub fn to_hex(self) -> String {
        self.prefixed("")
    }

    /// `prefix` followed by the key's text form, without the formatting machinery (store keys
    /// are built on every request).
    pub(crate) fn prefixed(self, prefix: &str) -> String {
        let mut hex = [0; KEY_HEX_LEN];
        self.encode(&mut hex);
        let mut key = String::with_capacity(prefix.len() + KEY_HEX_LEN);
        key.push_str(prefix);
        // Only ASCII hex digits were written.
        key.push_str(std::str::from_utf8(&hex).unwrap_or_default());
        key
    }

    /// Writes the key's text form into `out`.
    pub(crate) fn encode(self, out: &mut [u8; KEY_HEX_LEN]) {
        for (pair, byte) in out.chunks_exact_mut(2).zip(self.0) {
            pair[0] = HEX[usize::from(byte >> 4)];
            pair[1] = HEX[usize::from(byte & 0xf)];
        }
    }

    /// A short, log-safe name of the key: its first 8 hex digits. It identifies a session in
    /// logs and errors well enough to correlate them, and is neither the id nor the whole key.
    pub fn fingerprint(self) -> Fingerprint {
        let mut hex = [0; KEY_HEX_LEN];
        self.encode(&mut hex);
        let mut text = [0; 8];
        text.copy_from_slice(&hex[..8]);
        Fingerprint(text)
    }

    /// The key's top 32 bits, which are as random as the digest: a shard index for in-process
    /// maps.
    #[cfg(feature = "memory")]
    pub(crate) fn high_bits(self) -> u32 {
        u32::from_be_bytes([self.0[0], self.0[1], self.0[2], self.0[3]])
    }
}

#[cfg(test)]
impl Key {
    /// The key of a random id.
    pub(crate) fn random() -> Key {
        Key::of(Id::random())
    }
}

impl std::hash::Hash for Key {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // One integer: in-process maps keyed by digests can take its bits as they are.
        state.write_u128(u128::from_be_bytes(self.0));
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({}…)", self.fingerprint())
    }
}

/// A session's id with its store key, derived once: the id goes into the cookie, the key to the
/// store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IdKey {
    pub(crate) id: Id,
    pub(crate) key: Key,
}

impl IdKey {
    pub(crate) fn new(id: Id) -> IdKey {
        IdKey {
            id,
            key: Key::of(id),
        }
    }

    /// A new random id and its key.
    pub(crate) fn random() -> IdKey {
        IdKey::new(Id::random())
    }
}

/// A short, log-safe name of a session's [`Key`]: its first 8 hex digits (see
/// [`Key::fingerprint`]). `Display` prints the digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 8]);

impl Fingerprint {
    /// The 8 hex digits.
    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits are ever written.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_the_start_of_the_ids_blake3_digest() {
        let id: Id = "67e55044-10b1-426f-9247-bb680e5fe0c8".parse().unwrap();
        let digest = blake3::hash(&id.to_bytes()).to_hex();
        assert_eq!(Key::of(id).to_hex(), &digest[..32]);
        assert_eq!(Key::of(id).fingerprint().as_str(), &digest[..8]);
        assert_eq!(Key::from_bytes(Key::of(id).to_bytes()), Key::of(id));
    }

    #[test]
    fn no_text_form_holds_the_id() {
        let id = Id::random();
        let key = Key::of(id);
        let id_hex = id.to_string().replace('-', "");
        for text in [
            key.to_hex(),
            format!("{key:?}"),
            key.fingerprint().to_string(),
        ] {
            assert!(!text.contains(&id_hex[..8]), "{text}");
        }
        assert_eq!(format!("{key:?}"), format!("Key({}…)", key.fingerprint()));
    }

    #[cfg(feature = "memory")]
    #[test]
    fn the_map_bits_come_from_the_digest() {
        let key = Key::from_bytes(*b"\x01\x02\x03\x04\x05\x06\x07\x08abcdefgh");
        assert_eq!(key.high_bits(), 0x0102_0304);
    }
}
