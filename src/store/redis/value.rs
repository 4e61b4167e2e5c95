//! The stored value: what a session's Redis key holds, so that one plain `GET` answers
//! everything a load needs.
//!
//! ```text
//! <version>:<expiry>:<token>:<length>:<payload>
//! 7:001764590400000:3f2a9c0e1b7d4e58:27:{"d":{"count":7},"c":1764...}
//! <version>:<expiry>:<token>:<length>/<owner length>:<owner><payload>
//! 7:001764590400000:3f2a9c0e1b7d4e58:27/5:alice{"d":{"count":7},"c":1764...}
//! ```
//!
//! - `version`: the record's version in decimal, without leading zeros (the scripts compare it
//!   as text with the expected version);
//! - `expiry`: when the record expires, in Unix milliseconds, as exactly 15 decimal digits
//!   (zero-padded; the latest expiry the stores write, in the year 9999, has 15), so that the
//!   touch script can rewrite it in place (`SETRANGE`) without copying the payload;
//! - `token`: 16 lowercase hex digits naming the write that stored the value, so that a write
//!   whose reply was lost recognises its own effect when retried;
//! - `length`: the payload's length in bytes, in decimal, so that a value cut short on its way
//!   (Webdis's JSON stops at a NUL byte) is refused rather than read as another record;
//! - for a session with an [owner](crate::store::Record::owner) only: `/`, the owner's length in
//!   bytes (at most [`MAX_OWNER_BYTES`](crate::MAX_OWNER_BYTES)), `:` and the owner's UTF-8
//!   bytes. A value without them (every value written before owners existed) has no owner. The
//!   owner sits in the header, before the payload, so that the save script reads it with one
//!   bounded `GETRANGE` whatever the payload's size;
//! - the payload, byte for byte.
//!
//! The key's TTL is set to the same expiry by every write (and by the touch script, in the same
//! atomic step), so Redis drops expired sessions by itself; the expiry in the value is what a
//! load checks, against the application server's clock.

use std::fmt;
use std::sync::Arc;

use bytes::{Buf, Bytes};

/// The digits of the expiry field.
pub(crate) const EXPIRY_DIGITS: usize = 15;

/// The latest expiry the stores write: the last millisecond of the year 9999 (15 digits). Later
/// instants are stored as this one (Redis refuses expiry times that overflow its clock
/// arithmetic).
pub(crate) const MAX_EXPIRES_MS: u64 = 253_402_300_799_999;

/// The digits of the token field.
const TOKEN_DIGITS: usize = 16;

/// The longest header without an owner: a 20-digit version, the expiry, the token, a 20-digit
/// length, and the four colons.
pub(crate) const MAX_HEADER_LEN: usize = 20 + EXPIRY_DIGITS + TOKEN_DIGITS + 20 + 4;

/// The longest owner a value holds (the layer's own limit).
pub(crate) const MAX_OWNER_LEN: usize = crate::MAX_OWNER_BYTES;

/// The longest header with an owner: the owner's `/`, its length's 3 digits and the owner.
pub(crate) const MAX_OWNED_HEADER_LEN: usize = MAX_HEADER_LEN + 1 + 3 + MAX_OWNER_LEN;

/// The Lua pattern of a header's start, capturing the version and the token (Lua 5.1 patterns
/// have no counted repetition, hence the spelled-out digits).
macro_rules! lua_header_pattern {
    () => {
        "^(%d+):%d%d%d%d%d%d%d%d%d%d%d%d%d%d%d:(%x%x%x%x%x%x%x%x%x%x%x%x%x%x%x%x):"
    };
}
pub(crate) use lua_header_pattern;

/// The header of a stored value, `<version>:<expiry>:<token>:<length>:` (or
/// `<version>:<expiry>:<token>:<length>/<owner length>:<owner>`), in a fixed buffer (no
/// formatting machinery, no allocation: one is built for every write).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Header {
    buf: [u8; MAX_OWNED_HEADER_LEN],
    len: usize,
}

impl Header {
    /// The header of a value holding `payload_len` bytes of payload and `owner`. `expires_ms`
    /// is clamped to what Redis accepts (see [`clamp_expiry`]). An owner longer than
    /// [`MAX_OWNER_LEN`] is cut there: the protocol refuses such a record before it builds a
    /// header.
    pub(crate) fn new(
        version: u64,
        expires_ms: u64,
        token: u64,
        payload_len: usize,
        owner: Option<&str>,
    ) -> Header {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut header = Header {
            buf: [0; MAX_OWNED_HEADER_LEN],
            len: 0,
        };
        header.push(itoa::Buffer::new().format(version).as_bytes());
        header.push(b":");
        let mut expiry = [b'0'; EXPIRY_DIGITS];
        let mut ms = clamp_expiry(expires_ms);
        for digit in expiry.iter_mut().rev() {
            // `ms % 10` is below 10.
            *digit = b'0' + u8::try_from(ms % 10).unwrap_or(0);
            ms /= 10;
        }
        header.push(&expiry);
        header.push(b":");
        let mut hex = [0; TOKEN_DIGITS];
        for (i, slot) in hex.iter_mut().enumerate() {
            *slot = HEX[usize::try_from((token >> (60 - 4 * i)) & 0xf).unwrap_or(0)];
        }
        header.push(&hex);
        header.push(b":");
        header.push(itoa::Buffer::new().format(payload_len).as_bytes());
        if let Some(owner) = owner {
            let owner = &owner.as_bytes()[..owner.len().min(MAX_OWNER_LEN)];
            header.push(b"/");
            header.push(itoa::Buffer::new().format(owner.len()).as_bytes());
            header.push(b":");
            header.push(owner);
        } else {
            header.push(b":");
        }
        header
    }

    fn push(&mut self, bytes: &[u8]) {
        self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }

    /// The whole header.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// A Unix ms instant within what Redis accepts as an expiry time (and what the expiry field
/// holds).
pub(crate) fn clamp_expiry(ms: u64) -> u64 {
    ms.clamp(1, MAX_EXPIRES_MS)
}

/// A stored value, decoded: its header, the owner, and the payload, which shares the value's
/// buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stored {
    pub(crate) head: Head,
    pub(crate) owner: Option<Arc<str>>,
    pub(crate) payload: Bytes,
}

/// What a value's header says, and where its payload starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Head {
    pub(crate) version: u64,
    pub(crate) expires_ms: u64,
    pub(crate) token: u64,
    /// The payload's length, as the header says.
    pub(crate) payload_len: u64,
    /// The owner's length, for a value with an owner (its bytes end the header).
    pub(crate) owner_len: Option<usize>,
    /// The header's length: where the payload starts.
    pub(crate) len: usize,
}

impl Head {
    /// The owner's bytes in `value`, the value this header was read from.
    pub(crate) fn owner<'v>(&self, value: &'v [u8]) -> Option<&'v [u8]> {
        self.owner_len.map(|n| &value[self.len - n..self.len])
    }
}

/// Why a value is not one this layout describes. It names the field, never the value's bytes
/// (a value may hold another application's data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Malformed {
    /// The version is missing, not decimal, longer than a `u64`, or has leading zeros.
    Version,
    /// The expiry is not 15 decimal digits.
    Expiry,
    /// The token is not 16 lowercase hex digits.
    Token,
    /// The length is missing, not decimal, or has leading zeros.
    Length,
    /// The owner's length is not decimal, too long, or the owner is not that long or not UTF-8.
    Owner,
    /// The payload is not as long as the header says (the value was cut short on its way, or
    /// is not one of ours).
    Truncated {
        /// The length in the header.
        said: u64,
        /// The payload's actual length.
        got: usize,
    },
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const LAYOUT: &str = "`<version>:<expiry>:<token>:<length>:` header of a session value";
        match self {
            Malformed::Version => write!(f, "no version at the start of the {LAYOUT}"),
            Malformed::Expiry => write!(f, "no 15-digit expiry in the {LAYOUT}"),
            Malformed::Token => write!(f, "no 16-hex-digit write token in the {LAYOUT}"),
            Malformed::Length => write!(f, "no payload length in the {LAYOUT}"),
            Malformed::Owner => write!(f, "no well-formed owner in the {LAYOUT}"),
            Malformed::Truncated { said, got } => write!(
                f,
                "the payload is {got} bytes where its header says {said} (cut short on its \
                 way, or not a session value)"
            ),
        }
    }
}

impl std::error::Error for Malformed {}

/// Decodes a stored value, as a `GET` returned it. The payload keeps the value's buffer (no
/// copy).
pub(crate) fn decode(mut value: Bytes) -> Result<Stored, Malformed> {
    let head = parse_head(&value)?;
    let got = value.len() - head.len;
    if u64::try_from(got).ok() != Some(head.payload_len) {
        return Err(Malformed::Truncated {
            said: head.payload_len,
            got,
        });
    }
    // Advancing keeps a buffer made from a `Vec` without a shared-buffer allocation, which a
    // slice would need.
    // Checked UTF-8 by `parse_head`.
    let owner = head
        .owner(&value)
        .map(|o| Arc::from(String::from_utf8_lossy(o)));
    value.advance(head.len);
    Ok(Stored {
        head,
        owner,
        payload: value,
    })
}

/// Reads a value's header (the payload is not looked at).
pub(crate) fn parse_head(value: &[u8]) -> Result<Head, Malformed> {
    let (version, rest) = decimal(value).ok_or(Malformed::Version)?;
    let (expiry, rest) = rest
        .split_first_chunk::<EXPIRY_DIGITS>()
        .filter(|(_, rest)| rest.first() == Some(&b':'))
        .ok_or(Malformed::Expiry)?;
    let expires_ms = expiry.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0'))
    });
    let expires_ms = expires_ms.ok_or(Malformed::Expiry)?;
    let (token, rest) = rest[1..]
        .split_first_chunk::<TOKEN_DIGITS>()
        .filter(|(_, rest)| rest.first() == Some(&b':'))
        .ok_or(Malformed::Token)?;
    let token = token
        .iter()
        .try_fold(0u64, |n, &d| Some(n << 4 | u64::from(hex_digit(d)?)))
        .ok_or(Malformed::Token)?;
    let (payload_len, rest, owner_len) =
        if let Some((payload_len, rest)) = decimal_then(&rest[1..], b'/') {
            let (owner_len, rest) = decimal(rest).ok_or(Malformed::Owner)?;
            let owner_len = usize::try_from(owner_len)
                .ok()
                .filter(|&n| n <= MAX_OWNER_LEN && n <= rest.len())
                .ok_or(Malformed::Owner)?;
            std::str::from_utf8(&rest[..owner_len]).map_err(|_| Malformed::Owner)?;
            (payload_len, &rest[owner_len..], Some(owner_len))
        } else {
            let (payload_len, rest) = decimal(&rest[1..]).ok_or(Malformed::Length)?;
            (payload_len, rest, None)
        };
    Ok(Head {
        version,
        expires_ms,
        token,
        payload_len,
        owner_len,
        len: value.len() - rest.len(),
    })
}

/// A canonical decimal `u64` (no sign, no leading zeros) followed by a colon, and what follows
/// the colon.
fn decimal(s: &[u8]) -> Option<(u64, &[u8])> {
    decimal_then(s, b':')
}

/// A canonical decimal `u64` followed by `end`, and what follows `end`.
fn decimal_then(s: &[u8], end: u8) -> Option<(u64, &[u8])> {
    let digits = s.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || (digits > 1 && s[0] == b'0') || s.get(digits) != Some(&end) {
        return None;
    }
    let n = s[..digits].iter().try_fold(0u64, |n, &d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })?;
    Some((n, &s[digits + 1..]))
}

/// A lowercase hex digit's value.
fn hex_digit(d: u8) -> Option<u8> {
    match d {
        b'0'..=b'9' => Some(d - b'0'),
        b'a'..=b'f' => Some(d - b'a' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(header: &Header, payload: &[u8]) -> Bytes {
        let mut v = header.as_bytes().to_vec();
        v.extend_from_slice(payload);
        Bytes::from(v)
    }

    #[test]
    fn round_trip() {
        let payload = br#"{"d":{"n":1},"c":1764590400000}"#;
        let header = Header::new(42, 1_764_590_400_000, 0xdead_beef, payload.len(), None);
        assert_eq!(
            header.as_bytes(),
            b"42:001764590400000:00000000deadbeef:31:"
        );
        let stored = decode(value(&header, payload)).unwrap();
        assert_eq!(
            stored,
            Stored {
                head: Head {
                    version: 42,
                    expires_ms: 1_764_590_400_000,
                    token: 0xdead_beef,
                    payload_len: 31,
                    owner_len: None,
                    len: header.as_bytes().len(),
                },
                owner: None,
                payload: Bytes::from_static(payload),
            }
        );
        // The extremes fit the buffer.
        let max = Header::new(u64::MAX, u64::MAX, u64::MAX, usize::MAX, None);
        assert_eq!(max.as_bytes().len(), MAX_HEADER_LEN);
        let head = parse_head(max.as_bytes()).unwrap();
        assert_eq!(
            (head.version, head.expires_ms, head.token),
            (u64::MAX, MAX_EXPIRES_MS, u64::MAX)
        );
        let min = Header::new(0, 0, 0, 0, None);
        assert_eq!(min.as_bytes(), b"0:000000000000001:0000000000000000:0:");
        assert_eq!(decode(value(&min, b"")).unwrap().payload, Bytes::new());
    }

    #[test]
    fn the_header_matches_the_formatted_layout() {
        for (version, ms, token, len) in [
            (1, 1, 1, 1),
            (9, 999, 0xf, 9),
            (10, 1_000, 0x0123_4567_89ab_cdef, 10),
            (1_234_567_890, MAX_EXPIRES_MS, 0xdead_beef, 123_456),
        ] {
            let want = format!("{version}:{ms:015}:{token:016x}:{len}:");
            assert_eq!(
                Header::new(version, ms, token, len, None).as_bytes(),
                want.as_bytes()
            );
        }
    }

    #[test]
    fn the_payload_keeps_the_values_buffer() {
        let header = Header::new(3, 5, 1, 2, None);
        let v = value(&header, b"{}");
        let start = v.as_ptr() as usize;
        let stored = decode(v).unwrap();
        assert_eq!(
            stored.payload.as_ptr() as usize,
            start + header.as_bytes().len()
        );
    }

    /// Every way a value can fail this layout, each named by the field it fails at.
    #[test]
    fn malformed_values_are_refused() {
        use Malformed::{Expiry, Length, Token, Truncated, Version};
        let cases: &[(&[u8], Malformed)] = &[
            (b"", Version),
            (b"{\"d\":{}}", Version),
            (b":001764590400000:0000000000000001:2:{}", Version),
            (b"01:001764590400000:0000000000000001:2:{}", Version),
            (b"-1:001764590400000:0000000000000001:2:{}", Version),
            (b"1", Version),
            (
                b"18446744073709551616:001764590400000:0000000000000001:2:{}",
                Version,
            ),
            (
                b"99999999999999999999999:001764590400000:0000000000000001:2:{}",
                Version,
            ),
            // The layout before this one: `<version>:<token>:<payload>`.
            (b"1:0000000000000001:{\"d\":{}}", Expiry),
            (b"1:1764590400000:0000000000000001:2:{}", Expiry),
            (b"1:0017645904000000:0000000000000001:2:{}", Expiry),
            (b"1:00176459040000x:0000000000000001:2:{}", Expiry),
            (b"1:001764590400000", Expiry),
            (b"1:001764590400000:000000000000001:2:{}", Token),
            (b"1:001764590400000:00000000000000001:2:{}", Token),
            (b"1:001764590400000:000000000000000g:2:{}", Token),
            (b"1:001764590400000:000000000000000A:2:{}", Token),
            (b"1:001764590400000:0000000000000001", Token),
            (b"1:001764590400000:0000000000000001:", Length),
            (b"1:001764590400000:0000000000000001:{}", Length),
            (b"1:001764590400000:0000000000000001:02:{}", Length),
            (b"1:001764590400000:0000000000000001:2{}", Length),
            (
                b"1:001764590400000:0000000000000001:99999999999999999999999:{}",
                Length,
            ),
            (
                b"1:001764590400000:0000000000000001:3:{}",
                Truncated { said: 3, got: 2 },
            ),
            (
                b"1:001764590400000:0000000000000001:1:{}",
                Truncated { said: 1, got: 2 },
            ),
            // A NUL byte and what followed it cut off (Webdis's JSON).
            (
                b"1:001764590400000:0000000000000001:12:{\"d\":{}}",
                Truncated { said: 12, got: 8 },
            ),
        ];
        for (bad, why) in cases {
            assert_eq!(
                decode(Bytes::from_static(bad)),
                Err(*why),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        // Any byte in the payload is the payload's business, NUL and non-UTF-8 included.
        let stored = decode(Bytes::from_static(
            b"1:001764590400000:0000000000000001:4:\xff\0\n:",
        ))
        .unwrap();
        assert_eq!(&stored.payload[..], b"\xff\0\n:");
    }

    #[test]
    fn owners_round_trip_and_old_values_have_none() {
        let payload = br#"{"d":{}}"#;
        let header = Header::new(7, 5, 0xab, payload.len(), Some("al:ice/{x}"));
        assert_eq!(
            header.as_bytes(),
            b"7:000000000000005:00000000000000ab:8/10:al:ice/{x}"
        );
        let stored = decode(value(&header, payload)).unwrap();
        assert_eq!(stored.owner.as_deref(), Some("al:ice/{x}"));
        assert_eq!((stored.head.version, stored.head.owner_len), (7, Some(10)));
        assert_eq!(&stored.payload[..], payload);
        // The longest owner fits the buffer.
        let long = "é".repeat(MAX_OWNER_LEN / 2);
        let max = Header::new(u64::MAX, u64::MAX, u64::MAX, usize::MAX, Some(&long));
        assert_eq!(max.as_bytes().len(), MAX_OWNED_HEADER_LEN);
        assert_eq!(
            parse_head(max.as_bytes()).unwrap().owner(max.as_bytes()),
            Some(long.as_bytes())
        );
        // A value written before owners existed has none.
        let old = decode(Bytes::from_static(
            b"1:001764590400000:0000000000000001:2:{}",
        ))
        .unwrap();
        assert_eq!((old.owner, old.head.owner_len), (None, None));
        // A malformed owner part.
        for bad in [
            &b"1:001764590400000:0000000000000001:2/:{}"[..],
            b"1:001764590400000:0000000000000001:2/01:a{}",
            b"1:001764590400000:0000000000000001:2/9:ab",
            b"1:001764590400000:0000000000000001:2/257:{}",
            b"1:001764590400000:0000000000000001:2/1:\xff{}",
            b"1:001764590400000:0000000000000001:2/1{}",
        ] {
            assert_eq!(
                decode(Bytes::copy_from_slice(bad)),
                Err(Malformed::Owner),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn messages_name_the_field_not_the_bytes() {
        let e = decode(Bytes::from_static(b"secret:stuff")).unwrap_err();
        assert!(!e.to_string().contains("secret"), "{e}");
        assert!(e.to_string().contains("version"), "{e}");
    }

    #[test]
    fn expiries_are_clamped() {
        assert_eq!(clamp_expiry(0), 1);
        assert_eq!(clamp_expiry(u64::MAX), MAX_EXPIRES_MS);
        assert_eq!(MAX_EXPIRES_MS.to_string().len(), EXPIRY_DIGITS);
    }
}
