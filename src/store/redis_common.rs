//! What the Redis and Webdis stores share, so that both read and write the same keys: the
//! stored value's layout, the Lua scripts, and the expiry bounds.
//!
//! A `RedisStore` and a `WebdisStore` pointed at the
//! same Redis database with the same key prefix serve the same sessions.

use std::time::SystemTime;

use bytes::Bytes;

use crate::error::StoreError;
use crate::record::{Record, unix_ms};
use crate::store::{CreateOutcome, SaveOutcome};

/// The latest expiry the stores write: the last millisecond of the year 9999. Later instants
/// are stored as this one (Redis refuses expiry times that overflow its clock arithmetic).
pub(crate) const MAX_EXPIRES_MS: u64 = 253_402_300_799_999;

/// The body both load scripts share: the value `v` (or `nil` when missing) and its expiry `e`,
/// read in one atomic step. A load never moves the expiry: the layer decides a refresh and
/// makes it with a conditional [`TOUCH_LUA`].
macro_rules! load_body {
    () => {
        r"
local v = redis.call('GET', KEYS[1])
if not v then return false end
local e = redis.call('PEXPIRETIME', KEYS[1])
"
    };
}

/// Loads a record: `KEYS[1]` the key. Answers `nil`, or `{value, expiry in Unix ms, length of
/// the value in bytes}` (expiry `-1` for a key without one, which these stores never write).
/// The length lets a reader check that the value arrived whole (Webdis's JSON cannot carry
/// every byte string).
#[cfg_attr(not(feature = "webdis"), allow(dead_code))] // The Webdis store's.
pub(crate) const LOAD_LUA: &str = concat!(load_body!(), "return {v, e, #v}\n");

/// [`LOAD_LUA`] answering in one bulk string, for the Redis store: `nil`, or
/// `<expiry in Unix ms>:<value>` (expiry `-1` for a key without one). Over RESP a bulk string
/// carries its length, and one string is several times cheaper for a client to parse than an
/// array of three.
#[cfg_attr(not(feature = "redis"), allow(dead_code))] // The Redis store's.
pub(crate) const LOAD_PACKED_LUA: &str =
    concat!(load_body!(), "return string.format('%d:', e) .. v\n");

/// The start of both conditional scripts: answers 0 when the key is missing, 1 when the
/// version in its header is not `ARGV[1]`; what follows runs only on the expected version.
macro_rules! if_version {
    () => {
        r"
-- The header `<version>:<token>:` is at most 20 + 1 + 16 + 1 = 38 bytes.
local h = redis.call('GETRANGE', KEYS[1], 0, 63)
if h == '' then return 0 end
if string.match(h, '^(%d+):') ~= ARGV[1] then return 1 end
"
    };
}

/// Moves a record's expiry if its version is the expected one (value and version unchanged).
///
/// `KEYS[1]` the key; `ARGV[1]` the expected version; `ARGV[2]` the new expiry (Unix ms, within
/// what Redis accepts). Answers 0 (missing), 1 (conflict) or 2 (moved). Applied twice (a retry
/// after a lost reply), it answers 2 again: the version is unchanged by the first.
pub(crate) const TOUCH_LUA: &str = concat!(
    if_version!(),
    "redis.call('PEXPIREAT', KEYS[1], ARGV[2])\nreturn 2\n"
);

/// Deletes a record if its version is the expected one.
///
/// `KEYS[1]` the key; `ARGV[1]` the expected version. Answers 0 (missing), 1 (conflict) or 2
/// (deleted). Applied twice (a retry after a lost reply), the second answers 0: a retried
/// remove that does not answer 2 has an unknown outcome (see [`settle`]).
pub(crate) const REMOVE_LUA: &str =
    concat!(if_version!(), "redis.call('DEL', KEYS[1])\nreturn 2\n");

/// The outcome of a conditional script's answer (0 missing, 1 conflict, 2 saved).
pub(crate) fn script_outcome(answer: i64) -> Option<SaveOutcome> {
    match answer {
        0 => Some(SaveOutcome::Missing),
        1 => Some(SaveOutcome::Conflict),
        2 => Some(SaveOutcome::Saved),
        _ => None,
    }
}

/// What a conditional write may report. After a retry (the first attempt's reply was lost: the
/// connection broke after the command was sent), `Conflict` or `Missing` may be the first
/// attempt's own effect seen from outside (another writer saved on top of it, or it deleted
/// the record): the outcome is unknown, which is [`StoreError::unavailable`], so that the layer
/// neither replays the request's changes nor reports a false conflict. `Saved` is certain
/// either way.
pub(crate) fn settle(
    outcome: SaveOutcome,
    retried: bool,
    op: &'static str,
) -> Result<SaveOutcome, StoreError> {
    if retried && outcome != SaveOutcome::Saved {
        return Err(outcome_unknown(op));
    }
    Ok(outcome)
}

/// What a create may report: as [`settle`], `IdTaken` after a retry may be the first attempt's
/// own record, changed since by another writer.
pub(crate) fn settle_create(
    outcome: CreateOutcome,
    retried: bool,
) -> Result<CreateOutcome, StoreError> {
    if retried && outcome != CreateOutcome::Created {
        return Err(outcome_unknown("create"));
    }
    Ok(outcome)
}

/// The error for a write whose outcome is unknown.
fn outcome_unknown(op: &'static str) -> StoreError {
    StoreError::unavailable(OutcomeUnknown(op))
}

/// A write whose reply was lost and whose retry cannot tell whether the first attempt applied.
#[derive(Debug)]
struct OutcomeUnknown(&'static str);

impl std::fmt::Display for OutcomeUnknown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "outcome unknown: the connection broke after a {} was sent, and its retry found \
             the record changed; the first attempt may have been applied",
            self.0
        )
    }
}

impl std::error::Error for OutcomeUnknown {}

/// Splits a [`LOAD_PACKED_LUA`] reply into the expiry (negative: none) and where the stored
/// value starts.
#[cfg_attr(not(feature = "redis"), allow(dead_code))] // The Redis store's.
pub(crate) fn split_packed(reply: &[u8]) -> Option<(i64, usize)> {
    let negative = reply.first() == Some(&b'-');
    let first = usize::from(negative);
    let mut expiry: i64 = 0;
    let mut at = first;
    loop {
        match *reply.get(at)? {
            b':' if at > first => break,
            d @ b'0'..=b'9' => {
                expiry = expiry.checked_mul(10)?.checked_add(i64::from(d - b'0'))?;
            }
            _ => return None,
        }
        at += 1;
    }
    Some((if negative { -expiry } else { expiry }, at + 1))
}

/// Compare-and-set on the version in the value's header.
///
/// `KEYS[1]` the key; `ARGV[1]` the expected version; `ARGV[2]` the new version; `ARGV[3]` the
/// new value's expiry (Unix ms); `ARGV[4]` the new value's write token; `ARGV[5]` the new value
/// (header included; last, so that Webdis can send it as the request body). Answers 0
/// (missing), 1 (conflict) or 2 (saved). A value that already carries the new version *and this
/// write's token* is this very write, applied by an earlier attempt whose reply was lost: it
/// answers 2 again instead of a false conflict. (If another writer saved on top of it since,
/// the retry answers 1, which [`settle`] turns into an unknown outcome.)
pub(crate) const SAVE_LUA: &str = r"
-- The header `<version>:<token>:` is at most 20 + 1 + 16 + 1 = 38 bytes.
local h = redis.call('GETRANGE', KEYS[1], 0, 63)
if h == '' then return 0 end
local v, t = string.match(h, '^(%d+):(%x+):')
if v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[5], 'PXAT', ARGV[3])
  return 2
end
if v == ARGV[2] and t == ARGV[4] then return 2 end
return 1
";

/// The longest header: a 20-digit version, a colon, 16 hex digits, a colon.
pub(crate) const MAX_HEADER_LEN: usize = 20 + 1 + 16 + 1;

/// The header of a stored value, `<version>:<token as 16 hex digits>:`, in a fixed buffer
/// (no formatting machinery, no allocation: it is built for every write).
#[derive(Clone, Copy)]
pub(crate) struct Header {
    buf: [u8; MAX_HEADER_LEN],
    len: usize,
}

impl Header {
    pub(crate) fn new(version: u64, token: u64) -> Header {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut buf = [0u8; MAX_HEADER_LEN];
        // The version's digits, last first, at the end of a scratch buffer.
        let mut digits = [0u8; 20];
        let mut start = digits.len();
        let mut v = version;
        loop {
            start -= 1;
            // `v % 10` is below 10.
            digits[start] = b'0' + u8::try_from(v % 10).unwrap_or(0);
            v /= 10;
            if v == 0 {
                break;
            }
        }
        let n = digits.len() - start;
        buf[..n].copy_from_slice(&digits[start..]);
        buf[n] = b':';
        for (i, slot) in buf[n + 1..n + 17].iter_mut().enumerate() {
            *slot = HEX[usize::try_from((token >> (60 - 4 * i)) & 0xf).unwrap_or(0)];
        }
        buf[n + 17] = b':';
        Header { buf, len: n + 18 }
    }

    /// The whole header.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// The write token's 16 hex digits.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))] // The Redis store's.
    pub(crate) fn token_hex(&self) -> &[u8] {
        &self.buf[self.len - 17..self.len - 1]
    }
}

/// The header of a stored value: `<version>:<token as 16 hex digits>:`.
#[cfg_attr(not(feature = "webdis"), allow(dead_code))] // The Webdis store's.
pub(crate) fn header(version: u64, token: u64) -> String {
    // Only ASCII digits, hex digits and colons.
    String::from_utf8_lossy(Header::new(version, token).as_bytes()).into_owned()
}

/// The stored value of a record: [`header`], then the payload byte for byte.
#[cfg_attr(not(feature = "webdis"), allow(dead_code))] // The Webdis store's.
pub(crate) fn encode(record: &Record, token: u64) -> Vec<u8> {
    let header = Header::new(record.version(), token);
    let mut value = Vec::with_capacity(header.as_bytes().len() + record.data().len());
    value.extend_from_slice(header.as_bytes());
    value.extend_from_slice(record.data());
    value
}

/// The version and the payload of a stored value (the payload shares the value's buffer).
#[cfg_attr(not(feature = "webdis"), allow(dead_code))] // The Webdis store's.
pub(crate) fn decode(value: &Bytes) -> Result<(u64, Bytes), &'static str> {
    let (version, start) = parse_header(value)?;
    Ok((version, value.slice(start..)))
}

/// [`decode`] of the stored value that starts at `start` in `reply`, received as a `Vec`: the
/// payload keeps the vector's buffer, without the shared-buffer allocation a slice of it would
/// need.
#[cfg_attr(not(feature = "redis"), allow(dead_code))] // The Redis store's.
pub(crate) fn decode_vec_from(reply: Vec<u8>, start: usize) -> Result<(u64, Bytes), &'static str> {
    let (version, len) = parse_header(reply.get(start..).unwrap_or_default())?;
    let mut data = Bytes::from(reply);
    bytes::Buf::advance(&mut data, start + len);
    Ok((version, data))
}

/// The version in a stored value's header, and where the payload starts.
fn parse_header(value: &[u8]) -> Result<(u64, usize), &'static str> {
    const BAD: &str = "value lacks the `<version>:<token>:` header of a session record";
    let digits = value.iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 20 || value.get(digits) != Some(&b':') {
        return Err(BAD);
    }
    let version = value[..digits]
        .iter()
        .try_fold(0u64, |v, d| {
            v.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })
        .ok_or(BAD)?;
    let token_end = digits + 1 + 16;
    let token_ok = value.len() > token_end
        && value[digits + 1..token_end]
            .iter()
            .all(u8::is_ascii_hexdigit)
        && value[token_end] == b':';
    if !token_ok {
        return Err(BAD);
    }
    Ok((version, token_end + 1))
}

/// An instant as a Redis expiry time (Unix ms, within what Redis accepts).
pub(crate) fn expiry_ms(t: SystemTime) -> u64 {
    clamp_expiry_ms(unix_ms(t))
}

/// A Unix ms instant within what Redis accepts as an expiry time.
fn clamp_expiry_ms(ms: u64) -> u64 {
    ms.clamp(1, MAX_EXPIRES_MS)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::key::Key;

    #[test]
    fn value_round_trip() {
        let key = Key::random();
        let rec = Record::new(
            key,
            Bytes::from_static(b"{\"d\":{}}:x"),
            42,
            SystemTime::now(),
        );
        let value = encode(&rec, 0xdead_beef);
        assert!(value.starts_with(b"42:00000000deadbeef:"));
        assert!(value.starts_with(header(42, 0xdead_beef).as_bytes()));
        let (version, data) = decode(&Bytes::from(value)).unwrap();
        assert_eq!(version, 42);
        assert_eq!(data, rec.data());
        let max = Record::new(key, Bytes::new(), u64::MAX, SystemTime::now());
        assert_eq!(
            decode(&Bytes::from(encode(&max, u64::MAX))).unwrap().0,
            u64::MAX
        );
    }

    #[test]
    fn header_matches_the_formatted_layout() {
        for (version, token) in [
            (0, 0),
            (1, 1),
            (9, 0xf),
            (10, 0x0123_4567_89ab_cdef),
            (u64::MAX, u64::MAX),
            (1_234_567_890, 0xdead_beef),
        ] {
            let h = Header::new(version, token);
            let want = format!("{version}:{token:016x}:");
            assert_eq!(h.as_bytes(), want.as_bytes());
            assert_eq!(h.token_hex(), format!("{token:016x}").as_bytes());
            assert_eq!(header(version, token), want);
        }
        assert_eq!(Header::new(u64::MAX, 0).as_bytes().len(), MAX_HEADER_LEN);
    }

    #[test]
    fn decode_vec_from_agrees_with_decode() {
        let rec = Record::new(
            Key::random(),
            Bytes::from_static(b"{\"d\":{\"n\":1}}"),
            7,
            SystemTime::now(),
        );
        let value = encode(&rec, 0x1234);
        let (v1, d1) = decode(&Bytes::from(value.clone())).unwrap();
        let (v2, d2) = decode_vec_from(value, 0).unwrap();
        assert_eq!((v1, &d1), (v2, &d2));
        assert_eq!(d2, rec.data());
        // A spare capacity changes nothing.
        let mut spare = Vec::with_capacity(100);
        spare.extend_from_slice(b"3:0000000000000001:x");
        assert_eq!(
            decode_vec_from(spare, 0).unwrap(),
            (3, Bytes::from_static(b"x"))
        );
        assert!(decode_vec_from(b"x:0000000000000001:x".to_vec(), 0).is_err());
    }

    #[test]
    fn packed_replies_split() {
        assert_eq!(
            split_packed(b"1732650000000:1:x"),
            Some((1_732_650_000_000, 14))
        );
        assert_eq!(
            split_packed(b"253402300799999:"),
            Some((253_402_300_799_999, 16))
        );
        assert_eq!(split_packed(b"-1:1:0000000000000000:{}"), Some((-1, 3)));
        for bad in [
            &b""[..],
            b":1:",
            b"-:1",
            b"12a:1",
            b"1732650000000",
            b"99999999999999999999:x",
            b"123456789012345678901234:x",
        ] {
            assert_eq!(split_packed(bad), None, "{bad:?}");
        }
        let (v, d) = decode_vec_from(b"17:5:0000000000000001:{}".to_vec(), 3).unwrap();
        assert_eq!((v, &d[..]), (5, &b"{}"[..]));
        assert!(decode_vec_from(b"17:".to_vec(), 3).is_err());
        assert!(decode_vec_from(b"17".to_vec(), 3).is_err());
    }

    #[test]
    fn foreign_values_are_refused() {
        for bad in [
            &b""[..],
            b"{\"d\":{}}",
            b":0000000000000000:{}",
            b"1:00000000000000:{}",
            b"1:000000000000000g:{}",
            b"1:0000000000000000",
            b"1:0000000000000000x{}",
            b"99999999999999999999999:0000000000000000:{}",
            b"18446744073709551616:0000000000000000:{}",
        ] {
            assert!(decode(&Bytes::from_static(bad)).is_err(), "{bad:?}");
            assert!(decode_vec_from(bad.to_vec(), 0).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn expiry_is_clamped() {
        assert_eq!(expiry_ms(std::time::UNIX_EPOCH), 1);
        assert_eq!(
            expiry_ms(SystemTime::now() + Duration::from_secs(u64::from(u32::MAX) * 100)),
            MAX_EXPIRES_MS
        );
    }
}
