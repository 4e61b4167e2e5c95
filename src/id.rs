//! Session ids: generation from the OS CSPRNG and strict parsing.

use std::fmt;
use std::str::FromStr;

/// A session id: a random (version 4) UUID drawn from the operating system's CSPRNG.
///
/// 122 of its 128 bits are random. Its one text form, used in the cookie and by stores, is the
/// lowercase hyphenated UUID (`8-4-4-4-12` hex digits, 36 characters). Parsing accepts that
/// form only, with the version and variant bits of a v4 UUID, so an id that this crate cannot
/// have issued is rejected before any store sees it.
///
/// `Debug` does not print the id (it is a bearer secret); `Display` does, for stores and for
/// applications that index sessions by user.
///
/// # Examples
/// ```
/// use hyper_sessions::Id;
///
/// let id = Id::random();
/// let text = id.to_string();
/// assert_eq!(text.len(), 36);
/// assert_eq!(text.parse::<Id>().unwrap(), id);
/// assert!("not-an-id".parse::<Id>().is_err());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Id(u128);

/// The length of an id's text form.
pub(crate) const ID_LEN: usize = 36;

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Decodes eight lowercase hex digits held in a `u64` (the first digit in the lowest byte),
/// all bytes at once; `None` if any byte is not `0-9` or `a-f`.
#[inline]
fn hex8(x: u64) -> Option<u32> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // Per byte, for bytes below 0x80: the high bit says `byte >= lo`.
    let at_least = |lo: u8| ((x | HIGH) - ONES * u64::from(lo)) & HIGH;
    let digit = at_least(b'0') & !at_least(b'9' + 1);
    let letter = at_least(b'a') & !at_least(b'f' + 1);
    if x & HIGH != 0 || (digit | letter) != HIGH {
        return None;
    }
    // Nibble values: the low four bits, plus 9 for letters (which have bit 6 set).
    let v = (x & (ONES * 0x0f)) + ((x >> 6) & ONES) * 9;
    // Gather: pairs of nibbles into bytes, pairs of bytes into u16s, then the u32.
    let v = (((v & 0x000f_000f_000f_000f) << 4) | ((v >> 8) & 0x000f_000f_000f_000f))
        & 0x00ff_00ff_00ff_00ff;
    let v = (((v & 0x0000_00ff_0000_00ff) << 8) | ((v >> 16) & 0x0000_00ff_0000_00ff))
        & 0x0000_ffff_0000_ffff;
    // The masks leave 16 bits in each half.
    #[allow(clippy::cast_possible_truncation)]
    Some((((v & 0xffff) << 16) | (v >> 32)) as u32)
}

impl Id {
    /// A new random id from the operating system's CSPRNG.
    ///
    /// # Panics
    /// Panics if the operating system cannot supply random bytes (as `uuid::Uuid::new_v4` does);
    /// there is no safe id to hand out in that case.
    pub fn random() -> Self {
        Id(uuid::Uuid::new_v4().as_u128())
    }

    /// Parses the canonical text form from bytes, as found in a Cookie header.
    ///
    /// # Errors
    /// [`InvalidId`] for anything but a lowercase hyphenated version-4 UUID.
    pub fn parse_bytes(s: &[u8]) -> Result<Self, InvalidId> {
        let Ok(s) = <&[u8; ID_LEN]>::try_from(s) else {
            return Err(InvalidId(()));
        };
        if s[8] != b'-' || s[13] != b'-' || s[18] != b'-' || s[23] != b'-' {
            return Err(InvalidId(()));
        }
        // Four runs of eight hex digits, the hyphens skipped, decoded eight at a time.
        let word = |at: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&s[at..at + 4]);
            u64::from(u32::from_le_bytes(b))
        };
        let run = |a: usize, b: usize| hex8(word(a) | (word(b) << 32));
        let (Some(p0), Some(p1), Some(p2), Some(p3)) =
            (run(0, 4), run(9, 14), run(19, 24), run(28, 32))
        else {
            return Err(InvalidId(()));
        };
        let hi = (u64::from(p0) << 32) | u64::from(p1);
        let lo = (u64::from(p2) << 32) | u64::from(p3);
        // Version nibble 4 and RFC 4122 variant bits 10.
        if (hi >> 12) & 0xf != 4 || lo >> 62 != 0b10 {
            return Err(InvalidId(()));
        }
        Ok(Id((u128::from(hi) << 64) | u128::from(lo)))
    }

    /// The id as 16 bytes, big-endian (the UUID's byte order).
    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }

    /// Writes the canonical text form into a fixed buffer.
    pub(crate) fn encode(self, out: &mut [u8; ID_LEN]) {
        let bytes = self.0.to_be_bytes();
        let mut pos = 0;
        for (i, byte) in bytes.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                out[pos] = b'-';
                pos += 1;
            }
            out[pos] = HEX[usize::from(byte >> 4)];
            out[pos + 1] = HEX[usize::from(byte & 0xf)];
            pos += 2;
        }
    }

    /// `prefix` followed by the canonical text form, without the formatting machinery (store
    /// keys are built on every request).
    #[cfg(any(feature = "redis", feature = "webdis"))]
    pub(crate) fn prefixed(self, prefix: &str) -> String {
        let mut buf = [0u8; ID_LEN];
        self.encode(&mut buf);
        let mut key = String::with_capacity(prefix.len() + ID_LEN);
        key.push_str(prefix);
        // Only ASCII hex digits and hyphens were written.
        key.push_str(std::str::from_utf8(&buf).unwrap_or_default());
        key
    }

    /// The id's top 32 bits, which are random: a shard index for in-process maps.
    #[cfg(feature = "memory")]
    #[allow(clippy::cast_possible_truncation)]
    pub(crate) fn high_bits(self) -> u32 {
        (self.0 >> 96) as u32
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; ID_LEN];
        self.encode(&mut buf);
        // Only ASCII hex digits and hyphens were written.
        f.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Id(<redacted>)")
    }
}

impl FromStr for Id {
    type Err = InvalidId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Id::parse_bytes(s.as_bytes())
    }
}

/// The error for text that is not a session id this crate could have issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidId(());

impl fmt::Display for InvalidId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not a canonical version-4 session id")
    }
}

impl std::error::Error for InvalidId {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_matches_uuid_text() {
        for _ in 0..1000 {
            let id = Id::random();
            let text = id.to_string();
            assert_eq!(text, uuid::Uuid::from_u128(id.0).hyphenated().to_string());
            assert_eq!(text.parse::<Id>().unwrap(), id);
        }
    }

    #[test]
    fn ids_differ() {
        let a = Id::random();
        let b = Id::random();
        assert_ne!(a, b);
    }

    #[test]
    fn rejects_non_canonical_forms() {
        let good = Id::random().to_string();
        assert!(good.parse::<Id>().is_ok());
        let upper = good.to_uppercase();
        assert!(upper.parse::<Id>().is_err(), "uppercase is not canonical");
        let simple = good.replace('-', "");
        assert!(
            simple.parse::<Id>().is_err(),
            "unhyphenated is not canonical"
        );
        let braced = format!("{{{good}}}");
        assert!(braced.parse::<Id>().is_err());
        assert!(format!("{good} ").parse::<Id>().is_err());
        assert!(good[..35].parse::<Id>().is_err());
        assert!("".parse::<Id>().is_err());
        // Right shape, but version 1 and the nil UUID: never issued by us.
        assert!(
            "6ba7b810-9dad-11d1-80b4-00c04fd430c8"
                .parse::<Id>()
                .is_err()
        );
        assert!(
            "00000000-0000-0000-0000-000000000000"
                .parse::<Id>()
                .is_err()
        );
        // Version 4 with the wrong variant.
        assert!(
            "6ba7b810-9dad-41d1-c0b4-00c04fd430c8"
                .parse::<Id>()
                .is_err()
        );
        // Non-ASCII of the right byte length.
        let mut bytes = good.into_bytes();
        bytes[0] = 0xff;
        assert!(Id::parse_bytes(&bytes).is_err());
    }

    #[test]
    #[allow(clippy::cast_possible_truncation)] // random indices from a u64
    fn hex8_matches_a_plain_decoder() {
        let plain = |b: &[u8; 8]| -> Option<u32> {
            b.iter().try_fold(0u32, |acc, &c| {
                let d = match c {
                    b'0'..=b'9' => c - b'0',
                    b'a'..=b'f' => c - b'a' + 10,
                    _ => return None,
                };
                Some((acc << 4) | u32::from(d))
            })
        };
        let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
        let interesting = b"0123456789abcdefABCDEF/:@`g-\x00\x7f\x80\xff";
        for i in 0..200_000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let mut chunk = rng.to_le_bytes();
            if i % 2 == 0 {
                // Mostly valid digits, sometimes one odd byte.
                for (j, c) in chunk.iter_mut().enumerate() {
                    let pick = (rng >> (j * 5)) as usize;
                    *c = if j == (i / 2) % 11 {
                        interesting[pick % interesting.len()]
                    } else {
                        HEX[pick % 16]
                    };
                }
            }
            assert_eq!(hex8(u64::from_le_bytes(chunk)), plain(&chunk), "{chunk:?}");
        }
    }

    #[test]
    fn debug_does_not_leak() {
        let id = Id::random();
        assert!(!format!("{id:?}").contains(&id.to_string()[..8]));
    }
}
