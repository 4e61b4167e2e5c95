//! Signed cookie values: the id and a MAC of the cookie's name and the id, BLAKE3 in its keyed
//! mode.
//!
//! The format, with keys set ([`SessionLayerBuilder::signing_keys`]):
//!
//! ```text
//! <id>.<mac>
//! id  = the id's canonical text (36 characters, lowercase hyphenated UUID)
//! mac = base64url without padding (22 characters) of the first 16 bytes of
//!       BLAKE3-keyed(k, "<name>=<id>")
//! k   = BLAKE3-derive-key("hyper-sessions 2026-12-01 session cookie MAC key", key)
//! ```
//!
//! The MAC covers the cookie's name as well as the id, so a value cannot be moved from one
//! cookie name to another (cookie-rs's signed jar binds the name the same way). The id is
//! parsed before any MAC is computed, and the MAC is compared in constant time. Each key is
//! derived into a 256-bit MAC key once, when the layer is built, so a key of any length (32
//! bytes at least) can be used and a request hashes only its 40-odd bytes, in one BLAKE3
//! compression. The tag is 128 bits, as AES-GCM's and Poly1305's are: a forgery succeeds with
//! probability 2^-128 per try, and the cookie stays short.
//!
//! Why BLAKE3 and not HMAC-SHA256 (cookie-rs's signed jar): keyed BLAKE3 is a MAC by design (a
//! PRF under its key, like HMAC), the crate already depends on it for store keys, and it costs
//! about 700 instructions where HMAC-SHA256 costs about 7,000 without the CPU's SHA extensions
//! (under callgrind, or on CPUs that lack them): the issue's budget for signing a cookie was
//! 1,500 instructions per request.
//!
//! [`SessionLayerBuilder::signing_keys`]: crate::SessionLayerBuilder::signing_keys

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::error::{Error, Kind};
use crate::id::{ID_LEN, Id};

/// The shortest signing key accepted, in bytes: 256 bits of key material.
pub(crate) const MIN_KEY_LEN: usize = 32;

/// The BLAKE3 key-derivation context of the MAC keys: fixed for this format, unique to it.
pub(crate) const KEY_CONTEXT: &str = "hyper-sessions 2026-12-01 session cookie MAC key";

/// The MAC's length: 128 bits.
const TAG_LEN: usize = 16;

/// The MAC's length in the cookie: 16 bytes as unpadded base64url.
const MAC_TEXT_LEN: usize = 22;

/// The length of a signed cookie value: id, `.`, MAC.
pub(crate) const SIGNED_LEN: usize = ID_LEN + 1 + MAC_TEXT_LEN;

/// What a signed value says, after checking it against every key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verified {
    /// Signed with the first (current) key.
    Current(Id),
    /// Signed with a later, older key of the list: valid, but to be re-signed.
    Older(Id),
    /// Malformed, or no key's MAC matches.
    Invalid,
}

/// The signing keys, each derived into a MAC key: the first signs, all verify.
#[derive(Clone)]
pub(crate) struct Keys {
    macs: Box<[[u8; blake3::KEY_LEN]]>,
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the keys themselves.
        f.debug_struct("Keys")
            .field("count", &self.macs.len())
            .finish_non_exhaustive()
    }
}

impl Keys {
    /// The keys as configured: `None` for an empty list (unsigned cookies).
    ///
    /// # Errors
    /// A configuration error naming the position of a key shorter than [`MIN_KEY_LEN`] bytes
    /// (never its bytes).
    pub(crate) fn new(keys: &[Vec<u8>]) -> Result<Option<Keys>, Error> {
        if keys.is_empty() {
            return Ok(None);
        }
        let mut macs = Vec::with_capacity(keys.len());
        for (i, key) in keys.iter().enumerate() {
            if key.len() < MIN_KEY_LEN {
                return Err(Error::with(
                    Kind::Config,
                    format!(
                        "signing key {i} is {} bytes long; a signing key needs at least \
                         {MIN_KEY_LEN} random bytes",
                        key.len()
                    ),
                ));
            }
            macs.push(blake3::derive_key(KEY_CONTEXT, key));
        }
        Ok(Some(Keys {
            macs: macs.into_boxed_slice(),
        }))
    }

    /// The MAC of `"<name>=<id>"` under key `i`.
    fn mac(&self, i: usize, name: &[u8], id: &[u8]) -> [u8; TAG_LEN] {
        let key = &self.macs[i];
        // The message in one piece, hashed in one call: three `update`s cost a third more.
        let mut message = [0u8; 96];
        let len = name.len() + 1 + id.len();
        let digest = if let Some(buf) = message.get_mut(..len) {
            buf[..name.len()].copy_from_slice(name);
            buf[name.len()] = b'=';
            buf[name.len() + 1..].copy_from_slice(id);
            blake3::keyed_hash(key, buf)
        } else {
            // A cookie name over 58 bytes.
            blake3::Hasher::new_keyed(key)
                .update(name)
                .update(b"=")
                .update(id)
                .finalize()
        };
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&digest.as_bytes()[..TAG_LEN]);
        tag
    }

    /// The signed cookie value of `id` under the first key.
    pub(crate) fn sign(&self, name: &[u8], id: Id) -> [u8; SIGNED_LEN] {
        let mut out = [0u8; SIGNED_LEN];
        let mut text = [0u8; ID_LEN];
        id.encode(&mut text);
        out[..ID_LEN].copy_from_slice(&text);
        out[ID_LEN] = b'.';
        let tag = self.mac(0, name, &text);
        let written = URL_SAFE_NO_PAD.encode_slice(tag, &mut out[ID_LEN + 1..]);
        debug_assert_eq!(written, Ok(MAC_TEXT_LEN));
        out
    }

    /// Checks a cookie value: the id, then the MAC under each key in turn.
    pub(crate) fn verify(&self, name: &[u8], value: &[u8]) -> Verified {
        let Some((id_text, rest)) = value.split_at_checked(ID_LEN) else {
            return Verified::Invalid;
        };
        let Some((b'.', mac_text)) = rest.split_first() else {
            return Verified::Invalid;
        };
        // Cheap checks first: the id's shape, then the MAC's length and alphabet.
        let Ok(id) = Id::parse_bytes(id_text) else {
            return Verified::Invalid;
        };
        if mac_text.len() != MAC_TEXT_LEN {
            return Verified::Invalid;
        }
        let mut tag = [0u8; TAG_LEN];
        // Strict: the padding-free canonical form only (no trailing bits set, no `=`).
        if URL_SAFE_NO_PAD.decode_slice(mac_text, &mut tag) != Ok(tag.len()) {
            return Verified::Invalid;
        }
        for i in 0..self.macs.len() {
            if same(&self.mac(i, name, id_text), &tag) {
                return if i == 0 {
                    Verified::Current(id)
                } else {
                    Verified::Older(id)
                };
            }
        }
        Verified::Invalid
    }
}

/// Whether two tags are equal, in time that does not depend on where they differ.
fn same(a: &[u8; TAG_LEN], b: &[u8; TAG_LEN]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Kept opaque, so the comparison is not turned into an early exit.
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(list: &[&[u8]]) -> Keys {
        let owned: Vec<Vec<u8>> = list.iter().map(|k| k.to_vec()).collect();
        Keys::new(&owned).unwrap().unwrap()
    }

    const A: &[u8] = &[b'a'; 32];
    const B: &[u8] = &[b'b'; 40];

    #[test]
    fn round_trip_and_rotation() {
        let id = Id::random();
        let a = keys(&[A]);
        let signed = a.sign(b"id", id);
        assert_eq!(&signed[..ID_LEN], id.to_string().as_bytes());
        assert_eq!(a.verify(b"id", &signed), Verified::Current(id));
        let ba = keys(&[B, A]);
        assert_eq!(ba.verify(b"id", &signed), Verified::Older(id));
        assert_eq!(keys(&[B]).verify(b"id", &signed), Verified::Invalid);
        // The name is bound.
        assert_eq!(a.verify(b"sid", &signed), Verified::Invalid);
    }

    const KNOWN_ANSWER: &str = "6ba7b810-9dad-41d1-80b4-00c04fd430c8.b-Kyj3bJ4nA441xHMApO9w";

    #[test]
    fn matches_a_known_answer() {
        // From another implementation (Python's `blake3` package and `base64`):
        //   k = blake3(bytes([0x11] * 32), derive_key_context=KEY_CONTEXT).digest()
        //   urlsafe_b64encode(blake3(b"id=" + id, key=k).digest()[:16]).rstrip(b"=")
        // The fuzz seeds were made the same way.
        let id: Id = "6ba7b810-9dad-41d1-80b4-00c04fd430c8".parse().unwrap();
        let signed = keys(&[&[0x11; 32]]).sign(b"id", id);
        assert_eq!(std::str::from_utf8(&signed).unwrap(), KNOWN_ANSWER);
    }

    #[test]
    fn refuses_malformed_values() {
        let a = keys(&[A]);
        let id = Id::random();
        let signed = a.sign(b"id", id);
        let text = std::str::from_utf8(&signed).unwrap();
        let bad = [
            id.to_string(),
            text[..SIGNED_LEN - 1].to_owned(),
            format!("{text}A"),
            format!("{text}."),
            text.replacen('.', "..", 1),
            text.replacen('.', "-", 1),
            format!("{}.{}", &text[..ID_LEN], "!".repeat(MAC_TEXT_LEN)),
            format!("{}=", &text[..SIGNED_LEN - 1]),
            text.to_uppercase(),
            String::new(),
        ];
        for v in &bad {
            assert_eq!(a.verify(b"id", v.as_bytes()), Verified::Invalid, "{v}");
        }
        // Every single-byte change is refused.
        for at in 0..SIGNED_LEN {
            for byte in [b'0', b'a', b'A', b'-', b'_', b'.', 0xff] {
                let mut v = signed;
                if v[at] == byte {
                    continue;
                }
                v[at] = byte;
                assert_eq!(a.verify(b"id", &v), Verified::Invalid, "at {at}");
            }
        }
        // The last character carries 2 unused bits: a non-canonical twin is refused.
        let last = signed[SIGNED_LEN - 1];
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let pos = alphabet.iter().position(|&c| c == last).unwrap();
        let mut twin = signed;
        twin[SIGNED_LEN - 1] = alphabet[pos ^ 1];
        assert_eq!(a.verify(b"id", &twin), Verified::Invalid);
    }

    #[test]
    fn short_keys_are_refused_and_never_printed() {
        assert!(Keys::new(&[]).unwrap().is_none());
        let err = Keys::new(&[A.to_vec(), b"short-secret".to_vec()]).unwrap_err();
        assert!(err.is_config());
        let text = format!("{err:?} {}", crate::error::Chain(&err));
        assert!(text.contains("signing key 1 is 12 bytes"), "{text}");
        assert!(!text.contains("short-secret"), "{text}");
        assert!(Keys::new(&[vec![0; 31]]).is_err());
        assert!(Keys::new(&[vec![0; 32], vec![1; 200]]).is_ok());
        let debug = format!("{:?}", keys(&[A]));
        assert!(!debug.contains("aaaa"), "{debug}");
    }
}
