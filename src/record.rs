//! The stored record ([`Record`], what stores keep) and the session payload codec.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::de::DeserializeSeed;

use crate::config::Expiry;
use crate::id::Id;

/// One stored session, as a [`SessionStore`](crate::SessionStore) keeps it.
///
/// The store treats `data` as opaque bytes (the middleware encodes and decodes it), and keeps
/// `version` and the expiry beside it: `version` drives the compare-and-set of
/// [`SessionStore::save`](crate::SessionStore::save), and the expiry is when the store must
/// stop returning the record. Expiry instants have millisecond precision.
#[derive(Clone, PartialEq, Eq)]
pub struct Record {
    id: Id,
    data: Bytes,
    version: u64,
    expires_ms: u64,
}

impl Record {
    /// A record with these parts. Stores call this (or [`Record::from_unix_ms`]) when they load
    /// one.
    pub fn new(id: Id, data: Bytes, version: u64, expires_at: SystemTime) -> Self {
        Record::from_unix_ms(id, data, version, unix_ms(expires_at))
    }

    /// A record whose expiry is given in milliseconds since the Unix epoch, the form most
    /// stores keep (`PXAT` in Redis, an integer column in `SQLite`).
    pub fn from_unix_ms(id: Id, data: Bytes, version: u64, expires_at_unix_ms: u64) -> Self {
        Record {
            id,
            data,
            version,
            expires_ms: expires_at_unix_ms,
        }
    }

    /// The same record with another expiry.
    #[must_use]
    pub fn with_expires_at(mut self, expires_at: SystemTime) -> Self {
        self.expires_ms = unix_ms(expires_at);
        self
    }

    /// The session id.
    pub fn id(&self) -> Id {
        self.id
    }

    /// The encoded session payload. Stores keep it byte for byte.
    pub fn data(&self) -> &Bytes {
        &self.data
    }

    /// The record's version: 1 when created, one more on each successful save.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// When the record expires. A store must not return it from `load` at or after this instant.
    pub fn expires_at(&self) -> SystemTime {
        from_unix_ms(self.expires_ms)
    }

    /// The expiry in whole milliseconds since the Unix epoch.
    pub fn expires_at_unix_ms(&self) -> u64 {
        self.expires_ms
    }

    /// Whether the record has expired at `now`.
    pub fn is_expired_at(&self, now: SystemTime) -> bool {
        self.expires_ms <= unix_ms(now)
    }
}

impl fmt::Debug for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Record")
            .field("id", &self.id)
            .field("data_len", &self.data.len())
            .field("version", &self.version)
            .field("expires_at_unix_ms", &self.expires_ms)
            .finish()
    }
}

/// Milliseconds since the Unix epoch, saturating at 0 and `u64::MAX`.
pub fn unix_ms(t: SystemTime) -> u64 {
    // Whole seconds and millis in u64 arithmetic (`as_millis` divides a u128).
    t.duration_since(UNIX_EPOCH).map_or(0, |d| {
        d.as_secs()
            .saturating_mul(1000)
            .saturating_add(u64::from(d.subsec_millis()))
    })
}

/// The instant `ms` milliseconds after the Unix epoch.
pub fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// The decoded session payload: the user's values plus the middleware's bookkeeping.
///
/// Encoded as a JSON object: `{"d":{key: value, ...}, "f":[flash keys], "x":{...}, "a":deadline}`,
/// where only `d` is always present. Decoding is zero-copy: keys and values that need no
/// unescaping stay slices of the stored bytes (shared, reference-counted), so loading a session
/// allocates one small vector however many values it holds, and each value is parsed only when
/// it is read.
#[derive(Debug, Clone, Default)]
pub(crate) struct SessionData {
    /// The stored bytes that `Text::At` ranges point into.
    src: Bytes,
    /// Keys and raw JSON values, sorted by key bytes, keys unique.
    values: Vec<(Text, Text)>,
    /// Keys whose values are flashes: gone after their first read.
    pub(crate) flash: Vec<String>,
    /// This session's own expiry policy, overriding the layer's.
    pub(crate) expiry: Option<Expiry>,
    /// The absolute deadline (Unix ms) when the layer has an absolute lifetime.
    pub(crate) deadline: Option<u64>,
}

/// A string held either as a range of the stored bytes or on its own.
#[derive(Debug, Clone)]
enum Text {
    At(usize, usize),
    Own(Box<str>),
}

fn text_bytes<'a>(src: &'a [u8], t: &'a Text) -> &'a [u8] {
    match t {
        Text::At(a, b) => &src[*a..*b],
        Text::Own(s) => s.as_bytes(),
    }
}

/// Why stored bytes are not a session payload.
#[derive(Debug)]
pub(crate) enum DecodeError {
    TooLarge { len: usize, max: usize },
    Json(serde_json::Error),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::TooLarge { len, max } => {
                write!(f, "record of {len} bytes exceeds the limit of {max} bytes")
            }
            DecodeError::Json(_) => f.write_str("record is not a valid session payload"),
        }
    }
}

impl std::error::Error for DecodeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            DecodeError::Json(e) => Some(e),
            DecodeError::TooLarge { .. } => None,
        }
    }
}

impl SessionData {
    /// Decodes stored bytes, refusing anything over `max` bytes before parsing.
    pub(crate) fn decode(bytes: &Bytes, max: usize) -> Result<Self, DecodeError> {
        if bytes.len() > max {
            return Err(DecodeError::TooLarge {
                len: bytes.len(),
                max,
            });
        }
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let mut data = de::Payload { src: bytes }
            .deserialize(&mut de)
            .map_err(DecodeError::Json)?;
        de.end().map_err(DecodeError::Json)?;
        data.src = bytes.clone();
        let src = &data.src[..];
        let sorted = data
            .values
            .windows(2)
            .all(|w| text_bytes(src, &w[0].0) < text_bytes(src, &w[1].0));
        if !sorted {
            // A stable sort keeps duplicates in input order: the last one wins, as in a JSON
            // object read into a map.
            data.values
                .sort_by(|a, b| text_bytes(src, &a.0).cmp(text_bytes(src, &b.0)));
            let mut deduped: Vec<(Text, Text)> = Vec::with_capacity(data.values.len());
            for entry in std::mem::take(&mut data.values) {
                match deduped.last_mut() {
                    Some(last) if text_bytes(src, &last.0) == text_bytes(src, &entry.0) => {
                        *last = entry;
                    }
                    _ => deduped.push(entry),
                }
            }
            data.values = deduped;
        }
        // A flash key without a value is meaningless; drop it rather than trust it.
        let flash = std::mem::take(&mut data.flash);
        data.flash = flash.into_iter().filter(|k| data.contains(k)).collect();
        data.flash.sort_unstable();
        data.flash.dedup();
        Ok(data)
    }

    /// Encodes for storage.
    pub(crate) fn encode(&self) -> Bytes {
        let mut out = Vec::with_capacity(self.approx_len());
        out.extend_from_slice(b"{\"d\":{");
        for (i, (k, v)) in self.values.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            match k {
                // A borrowed key had no escapes in the source, so it needs none now.
                Text::At(a, b) => {
                    out.push(b'"');
                    out.extend_from_slice(&self.src[*a..*b]);
                    out.push(b'"');
                }
                // Writing a string into a Vec cannot fail.
                Text::Own(k) => {
                    let _ = serde_json::to_writer(&mut out, &**k);
                }
            }
            out.push(b':');
            out.extend_from_slice(self.text(v).as_bytes());
        }
        out.push(b'}');
        if !self.flash.is_empty() {
            out.extend_from_slice(b",\"f\":");
            let _ = serde_json::to_writer(&mut out, &self.flash);
        }
        if let Some(expiry) = &self.expiry {
            out.extend_from_slice(b",\"x\":");
            let _ = serde_json::to_writer(&mut out, expiry);
        }
        if let Some(deadline) = self.deadline {
            out.extend_from_slice(b",\"a\":");
            out.extend_from_slice(deadline.to_string().as_bytes());
        }
        out.push(b'}');
        Bytes::from(out)
    }

    fn text<'a>(&'a self, t: &'a Text) -> &'a str {
        match t {
            // The ranges were cut from a validated UTF-8 parse at character boundaries.
            Text::At(a, b) => std::str::from_utf8(&self.src[*a..*b]).unwrap_or_default(),
            Text::Own(s) => s,
        }
    }

    fn key_bytes<'a>(&'a self, t: &'a Text) -> &'a [u8] {
        text_bytes(&self.src, t)
    }

    fn find(&self, key: &str) -> Result<usize, usize> {
        self.values
            .binary_search_by(|(k, _)| self.key_bytes(k).cmp(key.as_bytes()))
    }

    /// The raw JSON text of the value under `key`.
    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.find(key).ok().map(|i| self.text(&self.values[i].1))
    }

    pub(crate) fn contains(&self, key: &str) -> bool {
        self.find(key).is_ok()
    }

    /// The keys, sorted.
    pub(crate) fn keys(&self) -> Vec<String> {
        self.values
            .iter()
            .map(|(k, _)| self.text(k).to_owned())
            .collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.values.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// The size of the encoded form, without encoding: keys and values plus JSON punctuation
    /// (escapes in keys may add a little; `encode` is checked again before a save).
    pub(crate) fn approx_len(&self) -> usize {
        let values: usize = self
            .values
            .iter()
            .map(|(k, v)| self.key_bytes(k).len() + self.key_bytes(v).len() + 4)
            .sum();
        let flash: usize = self.flash.iter().map(|k| k.len() + 3).sum();
        values + flash + 48
    }

    /// The size `approx_len` counts for one entry.
    pub(crate) fn entry_len(&self, key: &str) -> usize {
        self.get(key).map_or(0, |v| key.len() + v.len() + 4)
    }

    pub(crate) fn is_flash(&self, key: &str) -> bool {
        !self.flash.is_empty() && self.flash.iter().any(|k| k == key)
    }

    pub(crate) fn set(&mut self, key: &str, value: Box<str>) {
        self.unflash(key);
        self.put(key, value);
    }

    pub(crate) fn set_flash(&mut self, key: &str, value: Box<str>) {
        self.put(key, value);
        if !self.is_flash(key) {
            self.flash.push(key.to_owned());
        }
    }

    fn put(&mut self, key: &str, value: Box<str>) {
        match self.find(key) {
            Ok(i) => self.values[i].1 = Text::Own(value),
            Err(i) => self
                .values
                .insert(i, (Text::Own(key.into()), Text::Own(value))),
        }
    }

    pub(crate) fn remove(&mut self, key: &str) -> bool {
        self.unflash(key);
        match self.find(key) {
            Ok(i) => {
                self.values.remove(i);
                true
            }
            Err(_) => false,
        }
    }

    pub(crate) fn clear(&mut self) {
        self.values.clear();
        self.flash.clear();
    }

    fn unflash(&mut self, key: &str) {
        if !self.flash.is_empty() {
            self.flash.retain(|k| k != key);
        }
    }

    /// Equal payloads: the same keys, the same raw values, the same bookkeeping.
    #[cfg(test)]
    pub(crate) fn same_as(&self, other: &Self) -> bool {
        self.flash == other.flash
            && self.expiry == other.expiry
            && self.deadline == other.deadline
            && self.values.len() == other.values.len()
            && self
                .values
                .iter()
                .zip(&other.values)
                .all(|((ka, va), (kb, vb))| {
                    self.text(ka) == other.text(kb) && self.text(va) == other.text(vb)
                })
    }
}

/// The zero-copy deserializer of the payload.
mod de {
    use std::borrow::Cow;
    use std::fmt;

    use bytes::Bytes;
    use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
    use serde_json::value::RawValue;

    use super::{SessionData, Text};
    use crate::config::Expiry;

    /// Deserializes a payload whose slices are taken from `src`.
    pub(super) struct Payload<'s> {
        pub(super) src: &'s Bytes,
    }

    /// The offset range of `part` within `src` (it is a subslice of it).
    fn range(src: &[u8], part: &str) -> (usize, usize) {
        let start = part.as_ptr() as usize - src.as_ptr() as usize;
        (start, start + part.len())
    }

    impl<'de> DeserializeSeed<'de> for Payload<'_> {
        type Value = SessionData;

        fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<SessionData, D::Error> {
            d.deserialize_map(self)
        }
    }

    impl<'de> Visitor<'de> for Payload<'_> {
        type Value = SessionData;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a session payload object")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SessionData, A::Error> {
            let mut data = SessionData::default();
            let mut seen = [false; 4];
            while let Some(field) = map.next_key::<Cow<'de, str>>()? {
                let slot = match &*field {
                    "d" => 0,
                    "f" => 1,
                    "x" => 2,
                    "a" => 3,
                    _ => 4,
                };
                match slot {
                    0 if !seen[0] => {
                        data.values = map.next_value_seed(Values { src: self.src })?;
                    }
                    1 if !seen[1] => data.flash = map.next_value()?,
                    2 if !seen[2] => data.expiry = Some(map.next_value::<Expiry>()?),
                    3 if !seen[3] => data.deadline = Some(map.next_value()?),
                    _ => {
                        let other = &*field;
                        let _: IgnoredAny = map.next_value()?;
                        return Err(de::Error::custom(format!(
                            "unknown or repeated field {other:?}"
                        )));
                    }
                }
                seen[slot] = true;
            }
            if !seen[0] {
                return Err(de::Error::missing_field("d"));
            }
            Ok(data)
        }
    }

    struct Values<'s> {
        src: &'s Bytes,
    }

    impl<'de> DeserializeSeed<'de> for Values<'_> {
        type Value = Vec<(Text, Text)>;

        fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }
    }

    impl<'de> Visitor<'de> for Values<'_> {
        type Value = Vec<(Text, Text)>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an object of session values")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut values = Vec::with_capacity(map.size_hint().unwrap_or(4).min(64));
            while let Some(key) = map.next_key_seed(Key { src: self.src })? {
                let value: &'de RawValue = map.next_value()?;
                let (a, b) = range(self.src, value.get());
                values.push((key, Text::At(a, b)));
            }
            Ok(values)
        }
    }

    /// A key: borrowed from the source when it has no escapes, owned otherwise.
    struct Key<'s> {
        src: &'s Bytes,
    }

    impl<'de> DeserializeSeed<'de> for Key<'_> {
        type Value = Text;

        fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Text, D::Error> {
            d.deserialize_str(self)
        }
    }

    impl<'de> Visitor<'de> for Key<'_> {
        type Value = Text;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string key")
        }

        fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Text, E> {
            let (a, b) = range(self.src, v);
            Ok(Text::At(a, b))
        }

        fn visit_str<E: de::Error>(self, v: &str) -> Result<Text, E> {
            Ok(Text::Own(v.into()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<str> {
        s.into()
    }

    fn decode(bytes: &[u8], max: usize) -> Result<SessionData, DecodeError> {
        SessionData::decode(&Bytes::copy_from_slice(bytes), max)
    }

    #[test]
    fn round_trip() {
        let mut d = SessionData::default();
        d.set("count", raw("5"));
        d.set("name", raw(r#""a/b?c%d#e \"q\"\n é""#));
        d.set_flash("message", raw(r#""Saved!""#));
        d.deadline = Some(1_900_000_000_000);
        let bytes = d.encode();
        let back = SessionData::decode(&bytes, 1 << 20).unwrap();
        assert!(back.same_as(&d));
        assert_eq!(back.encode(), bytes);
        assert!(bytes.len() <= d.approx_len());
    }

    #[test]
    fn rejects_bad_input() {
        for bad in [
            &b""[..],
            b"null",
            b"[]",
            b"{}",
            b"{\"d\":[]}",
            b"{\"d\":{},\"zz\":1}",
            b"{\"d\":{\"a\":}}",
            b"\xff\xfe",
            b"{\"d\":{},\"f\":\"x\"}",
        ] {
            assert!(decode(bad, 1 << 20).is_err(), "{bad:?}");
        }
        // Deep nesting inside a value is kept raw, without recursion (no stack overflow);
        // reading it back as a JSON tree then fails cleanly at serde_json's depth limit.
        let deep = format!(
            "{{\"d\":{{\"a\":{}{}}}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        let data = decode(deep.as_bytes(), 1 << 20).unwrap();
        let raw = data.get("a").unwrap();
        assert!(serde_json::from_str::<serde_json::Value>(raw).is_err());
        // Deep nesting in the record's own structure is refused.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(decode(deep.as_bytes(), 1 << 20).is_err());
    }

    #[test]
    fn size_limit_is_checked_before_parsing() {
        let big = format!("{{\"d\":{{\"a\":\"{}\"}}}}", "x".repeat(2000));
        assert!(matches!(
            decode(big.as_bytes(), 1000),
            Err(DecodeError::TooLarge { .. })
        ));
        assert!(decode(big.as_bytes(), 4000).is_ok());
    }

    #[test]
    fn decoding_shares_the_stored_bytes_and_handles_escapes() {
        let d = decode(br#"{"d":{"z":1,"a\"b":"x\ny","a":[1,2],"z":2}}"#, 1000).unwrap();
        assert_eq!(d.keys(), vec!["a", "a\"b", "z"]);
        assert_eq!(d.get("z"), Some("2"), "the last duplicate wins");
        assert_eq!(d.get("a\"b"), Some(r#""x\ny""#));
        let again = decode(&d.encode(), 1000).unwrap();
        assert!(again.same_as(&d));
        assert_eq!(again.encode(), d.encode());
        for bad in [
            &br#"{"d":{},"d":{}}"#[..],
            br#"{"d":{},"a":1,"a":2}"#,
            br#"{"d":{"a":1}} x"#,
        ] {
            assert!(decode(bad, 1000).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn dangling_flash_keys_are_dropped() {
        let d = decode(br#"{"d":{"a":1},"f":["a","b","a"]}"#, 1000).unwrap();
        assert_eq!(d.flash, vec!["a".to_owned()]);
    }
}
