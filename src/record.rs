//! The stored record ([`Record`], what stores keep) and the session payload codec.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::config::Expiry;
use crate::id::Id;

/// One stored session, as a [`SessionStore`](crate::SessionStore) keeps it.
///
/// The store treats `data` as opaque bytes (the middleware encodes and decodes it), and keeps
/// `version` and `expires_at` beside it: `version` drives the compare-and-set of
/// [`SessionStore::save`](crate::SessionStore::save), and `expires_at` is when the store must
/// stop returning the record.
#[derive(Clone, PartialEq, Eq)]
pub struct Record {
    id: Id,
    data: Bytes,
    version: u64,
    expires_at: SystemTime,
}

impl Record {
    /// A record with these parts. Stores call this when they load one.
    pub fn new(id: Id, data: Bytes, version: u64, expires_at: SystemTime) -> Self {
        Record {
            id,
            data,
            version,
            expires_at,
        }
    }

    /// The same record with another expiry.
    #[must_use]
    pub fn with_expires_at(mut self, expires_at: SystemTime) -> Self {
        self.expires_at = expires_at;
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
        self.expires_at
    }

    /// `expires_at` in whole milliseconds since the Unix epoch (0 for instants before it), the
    /// form most stores keep (`PXAT` in Redis, an integer column in `SQLite`).
    pub fn expires_at_unix_ms(&self) -> u64 {
        unix_ms(self.expires_at)
    }

    /// Whether the record has expired at `now`.
    pub fn is_expired_at(&self, now: SystemTime) -> bool {
        self.expires_at <= now
    }
}

impl fmt::Debug for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Record")
            .field("id", &self.id)
            .field("data_len", &self.data.len())
            .field("version", &self.version)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// Milliseconds since the Unix epoch, saturating at 0 and `u64::MAX`.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The instant `ms` milliseconds after the Unix epoch.
pub fn from_unix_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// The decoded session payload: the user's values plus the middleware's bookkeeping.
///
/// Encoded as a JSON object: `{"d":{key: value, ...}, "f":[flash keys], "x":{...}, "a":deadline}`,
/// where only `d` is always present. Values stay as raw JSON text, so loading a session parses
/// each value only when it is read.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SessionData {
    #[serde(rename = "d")]
    pub(crate) values: BTreeMap<String, Box<RawValue>>,
    /// Keys whose values are flashes: gone after their first read.
    #[serde(rename = "f", default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) flash: Vec<String>,
    /// This session's own expiry policy, overriding the layer's.
    #[serde(rename = "x", default, skip_serializing_if = "Option::is_none")]
    pub(crate) expiry: Option<Expiry>,
    /// The absolute deadline (Unix ms) when the layer has an absolute lifetime.
    #[serde(rename = "a", default, skip_serializing_if = "Option::is_none")]
    pub(crate) deadline: Option<u64>,
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
    pub(crate) fn decode(bytes: &[u8], max: usize) -> Result<Self, DecodeError> {
        if bytes.len() > max {
            return Err(DecodeError::TooLarge {
                len: bytes.len(),
                max,
            });
        }
        let mut json = serde_json::Deserializer::from_slice(bytes);
        let mut data = SessionData::deserialize(ObjectOnly(&mut json))
            .and_then(|data| json.end().map(|()| data))
            .map_err(DecodeError::Json)?;
        // A flash key without a value is meaningless; drop it rather than trust it.
        data.flash.retain(|k| data.values.contains_key(k));
        data.flash.sort_unstable();
        data.flash.dedup();
        Ok(data)
    }

    /// Encodes for storage.
    pub(crate) fn encode(&self) -> Bytes {
        // Serializing maps of strings and raw JSON cannot fail.
        Bytes::from(serde_json::to_vec(self).unwrap_or_default())
    }

    /// The size of the encoded form, without encoding: keys and values plus JSON punctuation
    /// (escapes in keys may add a little; `encode` is checked again before a save).
    pub(crate) fn approx_len(&self) -> usize {
        let values: usize = self
            .values
            .iter()
            .map(|(k, v)| k.len() + v.get().len() + 4)
            .sum();
        let flash: usize = self.flash.iter().map(|k| k.len() + 3).sum();
        values + flash + 48
    }

    pub(crate) fn is_flash(&self, key: &str) -> bool {
        !self.flash.is_empty() && self.flash.iter().any(|k| k == key)
    }

    pub(crate) fn set(&mut self, key: &str, value: Box<RawValue>) {
        self.unflash(key);
        self.values.insert(key.to_owned(), value);
    }

    pub(crate) fn set_flash(&mut self, key: &str, value: Box<RawValue>) {
        self.values.insert(key.to_owned(), value);
        if !self.is_flash(key) {
            self.flash.push(key.to_owned());
        }
    }

    pub(crate) fn remove(&mut self, key: &str) -> bool {
        self.unflash(key);
        self.values.remove(key).is_some()
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

    /// Equal payloads, comparing raw values by their text (`RawValue` has no `PartialEq`).
    /// Used by the tests and by the `record_decode` fuzz invariants.
    pub(crate) fn same_as(&self, other: &Self) -> bool {
        self.flash == other.flash
            && self.expiry == other.expiry
            && self.deadline == other.deadline
            && self.values.len() == other.values.len()
            && self
                .values
                .iter()
                .zip(&other.values)
                .all(|((ka, va), (kb, vb))| ka == kb && va.get() == vb.get())
    }
}

/// Hands a struct's `Deserialize` only the JSON-object form.
///
/// serde's derived `Deserialize` for a struct also accepts a JSON array of its fields in order
/// (`[{}]` would decode as `{"d":{}}`): a second form the encoder never writes, which also
/// re-encodes longer than it was stored. The payload format is the object form only.
struct ObjectOnly<D>(D);

impl<'de, D: serde::Deserializer<'de>> serde::Deserializer<'de> for ObjectOnly<D> {
    type Error = D::Error;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, D::Error> {
        self.0.deserialize_map(visitor)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum identifier
        ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).unwrap()
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
            // The array form serde derives for structs (found by the record_decode fuzzer).
            b"[{}]",
            b" [{\"a\":1},[\"a\"],{\"i\":1000},5] ",
            b"{\"d\":{}} x",
        ] {
            assert!(SessionData::decode(bad, 1 << 20).is_err(), "{bad:?}");
        }
        // Deep nesting inside a value is kept raw, without recursion (no stack overflow);
        // reading it back as a JSON tree then fails cleanly at serde_json's depth limit.
        let deep = format!(
            "{{\"d\":{{\"a\":{}{}}}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        let data = SessionData::decode(deep.as_bytes(), 1 << 20).unwrap();
        let raw = data.values.get("a").unwrap().get();
        assert!(serde_json::from_str::<serde_json::Value>(raw).is_err());
        // Deep nesting in the record's own structure is refused.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(SessionData::decode(deep.as_bytes(), 1 << 20).is_err());
    }

    #[test]
    fn size_limit_is_checked_before_parsing() {
        let big = format!("{{\"d\":{{\"a\":\"{}\"}}}}", "x".repeat(2000));
        assert!(matches!(
            SessionData::decode(big.as_bytes(), 1000),
            Err(DecodeError::TooLarge { .. })
        ));
        assert!(SessionData::decode(big.as_bytes(), 4000).is_ok());
    }

    #[test]
    fn dangling_flash_keys_are_dropped() {
        let d = SessionData::decode(br#"{"d":{"a":1},"f":["a","b","a"]}"#, 1000).unwrap();
        assert_eq!(d.flash, vec!["a".to_owned()]);
    }
}
