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
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Id {
    // The UUID's high and low halves: the order of the u128, with 8-byte alignment (a u128
    // would pad every struct that holds an id to 16).
    hi: u64,
    lo: u64,
}

impl std::hash::Hash for Id {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u128(self.as_u128());
    }
}

/// The length of an id's text form.
pub(crate) const ID_LEN: usize = 36;

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Decodes eight lowercase hex digits held in a `u64` (the first digit in the lowest byte),
/// all bytes at once; `None` if any byte is not `0-9` or `a-f`.
///
/// Each byte's nibble is computed as if it were a digit (its low four bits, plus 9 for bytes
/// with bit 6 set, as letters have); the byte was one exactly when that nibble is below 16 and
/// writes back as the same byte.
#[inline]
fn hex8(x: u64) -> Option<u32> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    let nibbles = (x & (ONES * 0x0f)) + ((x >> 6) & ONES) * 9;
    // Back to text: '0' + n, plus 39 more (to 'a') where n >= 10. No byte carries into the next.
    let letters = ((nibbles + ONES * 6) >> 4) & ONES;
    let text = nibbles + ONES * u64::from(b'0') + letters * 39;
    if text != x || nibbles & (ONES * 0xf0) != 0 {
        return None;
    }
    // Gather: pairs of nibbles into bytes, pairs of bytes into u16s, then the u32.
    let v = ((nibbles << 4) | (nibbles >> 8)) & 0x00ff_00ff_00ff_00ff;
    let v = ((v << 8) | (v >> 16)) & 0x0000_ffff_0000_ffff;
    // The masks leave 16 bits in each half.
    #[allow(clippy::cast_possible_truncation)]
    Some(((v << 16) | (v >> 32)) as u32)
}

impl Id {
    /// A new random id from the operating system's CSPRNG: one `getrandom` call per id, so
    /// no random bytes are held in memory and a forked process draws ids of its own.
    ///
    /// # Panics
    /// Panics if the operating system cannot supply random bytes (as `uuid::Uuid::new_v4` does);
    /// there is no safe id to hand out in that case.
    pub fn random() -> Self {
        let mut bytes = [0u8; 16];
        if let Err(e) = getrandom::fill(&mut bytes) {
            panic!("hyper-sessions: the OS CSPRNG failed, no session id can be made: {e}");
        }
        Id::from_u128(
            uuid::Builder::from_random_bytes(bytes)
                .into_uuid()
                .as_u128(),
        )
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
        Ok(Id { hi, lo })
    }

    /// The id as 16 bytes, big-endian (the UUID's byte order).
    pub fn to_bytes(self) -> [u8; 16] {
        self.as_u128().to_be_bytes()
    }

    fn as_u128(self) -> u128 {
        (u128::from(self.hi) << 64) | u128::from(self.lo)
    }

    #[allow(clippy::cast_possible_truncation)]
    fn from_u128(n: u128) -> Self {
        Id {
            hi: (n >> 64) as u64,
            lo: n as u64,
        }
    }

    /// Writes the canonical text form into a fixed buffer.
    pub(crate) fn encode(self, out: &mut [u8; ID_LEN]) {
        let bytes = self.to_bytes();
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
            assert_eq!(
                text,
                uuid::Uuid::from_u128(id.as_u128()).hyphenated().to_string()
            );
            assert_eq!(text.parse::<Id>().unwrap(), id);
        }
    }

    #[test]
    fn ids_are_distinct_v4_and_every_random_bit_varies() {
        let n = 10_000;
        let mut seen = std::collections::HashSet::new();
        let mut ones = [0u32; 128];
        for _ in 0..n {
            let id = Id::random();
            assert!(seen.insert(id), "an id came twice");
            let text = id.to_string();
            assert_eq!(text.parse::<Id>(), Ok(id), "not a v4 id: {text}");
            let v = id.as_u128();
            for (bit, count) in ones.iter_mut().enumerate() {
                *count += u32::from((v >> bit) & 1 == 1);
            }
        }
        // 122 random bits, each set in about half the ids (a zeroed or repeated buffer would
        // show as bits stuck at 0); the 6 version/variant bits are fixed.
        let fixed = [76, 77, 78, 79, 62, 63];
        for (bit, &count) in ones.iter().enumerate() {
            if !fixed.contains(&bit) {
                assert!(
                    (4_500..=5_500).contains(&count),
                    "bit {bit} set {count} times of {n}"
                );
            }
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
    fn every_single_byte_change_is_judged_as_the_uuid_crate_would() {
        // The reference: uuid's parser, plus lowercase hyphenated form and the v4 bits.
        let reference = |b: &[u8]| -> Option<u128> {
            let text = std::str::from_utf8(b).ok()?;
            let uuid = uuid::Uuid::try_parse(text).ok()?;
            let canonical = uuid.hyphenated().to_string() == text;
            let v4 = uuid.get_version_num() == 4 && uuid.get_variant() == uuid::Variant::RFC4122;
            (canonical && v4).then(|| uuid.as_u128())
        };
        for _ in 0..4 {
            let text = Id::random().to_string().into_bytes();
            for at in 0..ID_LEN {
                for byte in 0..=255u8 {
                    let mut b = text.clone();
                    b[at] = byte;
                    assert_eq!(
                        Id::parse_bytes(&b).ok().map(Id::as_u128),
                        reference(&b),
                        "{:?}",
                        String::from_utf8_lossy(&b)
                    );
                }
            }
        }
    }

    #[test]
    fn debug_does_not_leak() {
        let id = Id::random();
        assert!(!format!("{id:?}").contains(&id.to_string()[..8]));
    }
}
