//! The session payload codec: [`SessionData`], what a record's opaque bytes hold, and its
//! reader and writer.

use std::fmt;
use std::sync::Arc;

use bytes::Bytes;

use crate::config::Expiry;

/// How many decimal digits `n` has.
fn decimal_len(n: u64) -> usize {
    n.checked_ilog10().map_or(1, |l| l as usize + 1)
}

/// The decoded session payload: the user's values plus the middleware's bookkeeping.
///
/// Encoded as a JSON object: `{"d":{key: value, ...}, "f":[flash keys], "x":{...}, "c":created,
/// "o":owner, "l":label}`, where only `d` is always present (`c`, the creation time, is written
/// for every session; `o` and `l` only for a session whose owner or label was set).
/// Decoding is zero-copy: keys and values that need no unescaping stay slices of the stored bytes (shared, reference-counted), so loading a session
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
    /// When the session was created (Unix ms): the start of the layer's absolute lifetime.
    pub(crate) created: Option<u64>,
    /// The user the session belongs to, as the application named it.
    pub(crate) owner: Option<Arc<str>>,
    /// The application's name for this session in its owner's list (a device, say).
    pub(crate) label: Option<Arc<str>>,
}

/// A string held either as a range of the stored bytes or on its own.
#[derive(Debug, Clone)]
enum Text {
    At(usize, usize),
    Own(Arc<str>),
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
    TooLarge {
        len: usize,
        max: usize,
    },
    /// Not UTF-8, so not JSON; `at` is where the valid UTF-8 ends.
    NotUtf8 {
        at: usize,
    },
    /// `serde_json` refused the record. Its own error is not kept: its message quotes the stored
    /// text ("invalid type: string \"...\""), which is session data and must not reach a log.
    Json {
        what: &'static str,
        column: usize,
    },
}

impl DecodeError {
    /// What `serde_json` found wrong (its category) and where, without any of the stored text.
    fn json(e: &serde_json::Error) -> DecodeError {
        let what = match e.classify() {
            serde_json::error::Category::Syntax => "malformed JSON",
            serde_json::error::Category::Eof => "truncated JSON",
            serde_json::error::Category::Data => {
                "a missing, repeated or unknown field, or a value of the wrong type"
            }
            serde_json::error::Category::Io => "unreadable JSON",
        };
        DecodeError::Json {
            what,
            column: e.column(),
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::TooLarge { len, max } => {
                write!(f, "record of {len} bytes exceeds the limit of {max} bytes")
            }
            DecodeError::NotUtf8 { at } => write!(
                f,
                "record is not a valid session payload: invalid UTF-8 at byte {at}"
            ),
            DecodeError::Json { what, column } => write!(
                f,
                "record is not a valid session payload: {what} at column {column}"
            ),
        }
    }
}

impl std::error::Error for DecodeError {}

impl SessionData {
    /// Decodes stored bytes, refusing anything over `max` bytes before parsing.
    pub(crate) fn decode(bytes: &Bytes, max: usize) -> Result<Self, DecodeError> {
        if bytes.len() > max {
            return Err(DecodeError::TooLarge {
                len: bytes.len(),
                max,
            });
        }
        let mut data = read::payload(bytes)?;
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
        if !data.flash.is_empty() {
            // A flash key without a value is meaningless; drop it rather than trust it.
            let flash = std::mem::take(&mut data.flash);
            data.flash = flash.into_iter().filter(|k| data.contains(k)).collect();
            data.flash.sort_unstable();
            data.flash.dedup();
        }
        Ok(data)
    }

    /// Encodes for storage.
    pub(crate) fn encode(&self) -> Bytes {
        // An exactly sized buffer becomes `Bytes` without another allocation.
        let mut out = Vec::with_capacity(self.exact_len().unwrap_or_else(|| self.approx_len()));
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
            out.extend_from_slice(self.raw_bytes(v));
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
        if let Some(created) = self.created {
            out.extend_from_slice(b",\"c\":");
            out.extend_from_slice(itoa::Buffer::new().format(created).as_bytes());
        }
        if let Some(owner) = &self.owner {
            out.extend_from_slice(b",\"o\":");
            let _ = serde_json::to_writer(&mut out, &**owner);
        }
        if let Some(label) = &self.label {
            out.extend_from_slice(b",\"l\":");
            let _ = serde_json::to_writer(&mut out, &**label);
        }
        out.push(b'}');
        debug_assert!(self.exact_len().is_none_or(|n| n == out.len()));
        Bytes::from(out)
    }

    /// The encoded size when it is cheap to know exactly: only values, and keys that need no
    /// escaping (the usual case).
    fn exact_len(&self) -> Option<usize> {
        if !self.flash.is_empty()
            || self.expiry.is_some()
            || self.owner.is_some()
            || self.label.is_some()
        {
            return None;
        }
        let mut len = b"{\"d\":{}}".len() + self.values.len().saturating_sub(1);
        if let Some(created) = self.created {
            // `,"c":` and the digits.
            len += 5 + decimal_len(created);
        }
        for (k, v) in &self.values {
            let key = self.raw_bytes(k);
            if let Text::Own(_) = k
                && key.iter().any(|&b| b == b'"' || b == b'\\' || b < 0x20)
            {
                return None;
            }
            // `"key":value`
            len += key.len() + 3 + self.raw_bytes(v).len();
        }
        Some(len)
    }

    fn text<'a>(&'a self, t: &'a Text) -> &'a str {
        match t {
            // The ranges were cut from a validated UTF-8 parse at character boundaries.
            Text::At(a, b) => std::str::from_utf8(&self.src[*a..*b]).unwrap_or_default(),
            Text::Own(s) => s,
        }
    }

    fn raw_bytes<'a>(&'a self, t: &'a Text) -> &'a [u8] {
        text_bytes(&self.src, t)
    }

    fn find(&self, key: &str) -> Result<usize, usize> {
        self.values
            .binary_search_by(|(k, _)| self.raw_bytes(k).cmp(key.as_bytes()))
    }

    /// The raw JSON text of the value under `key`.
    pub(crate) fn get(&self, key: &str) -> Option<&str> {
        self.find(key).ok().map(|i| self.text(&self.values[i].1))
    }

    /// [`get`](SessionData::get) as bytes (no UTF-8 check: for readers that check as they go).
    pub(crate) fn get_bytes(&self, key: &str) -> Option<&[u8]> {
        self.find(key)
            .ok()
            .map(|i| self.raw_bytes(&self.values[i].1))
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

    /// No values, no owner and no label: nothing worth a record.
    pub(crate) fn is_empty(&self) -> bool {
        self.values.is_empty() && self.owner.is_none() && self.label.is_none()
    }

    /// The size of the encoded form, without encoding: keys and values plus JSON punctuation
    /// (escapes in keys may add a little; `encode` is checked again before a save).
    pub(crate) fn approx_len(&self) -> usize {
        let values: usize = self
            .values
            .iter()
            .map(|(k, v)| self.raw_bytes(k).len() + self.raw_bytes(v).len() + 4)
            .sum();
        let flash: usize = self.flash.iter().map(|k| k.len() + 3).sum();
        let named: usize = [&self.owner, &self.label]
            .into_iter()
            .flatten()
            .map(|s| s.len() + 8)
            .sum();
        values + flash + named + 48
    }

    /// The size `approx_len` counts for one entry.
    pub(crate) fn entry_len(&self, key: &str) -> usize {
        self.get(key).map_or(0, |v| key.len() + v.len() + 4)
    }

    pub(crate) fn is_flash(&self, key: &str) -> bool {
        !self.flash.is_empty() && self.flash.iter().any(|k| k == key)
    }

    pub(crate) fn set(&mut self, key: &str, value: Arc<str>) {
        self.unflash(key);
        self.put(key, value);
    }

    pub(crate) fn set_flash(&mut self, key: &str, value: Arc<str>) {
        self.put(key, value);
        if !self.is_flash(key) {
            self.flash.push(key.to_owned());
        }
    }

    fn put(&mut self, key: &str, value: Arc<str>) {
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

    /// Removes every value, and the owner and label with them.
    pub(crate) fn clear(&mut self) {
        self.values.clear();
        self.flash.clear();
        self.owner = None;
        self.label = None;
    }

    fn unflash(&mut self, key: &str) {
        if !self.flash.is_empty() {
            self.flash.retain(|k| k != key);
        }
    }

    /// Equal payloads: the same keys, the same raw values, the same bookkeeping. Used by the
    /// tests and by the `record_decode` fuzz invariants.
    #[cfg(any(test, feature = "__fuzz"))]
    pub(crate) fn same_as(&self, other: &Self) -> bool {
        self.flash == other.flash
            && self.expiry == other.expiry
            && self.created == other.created
            && self.owner == other.owner
            && self.label == other.label
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

/// Reading the payload. The layout this crate writes for plain values (every record of the
/// benchmark's endpoints) is recognized in one pass by hand; `serde_json` reads everything
/// else. Both record where each key and value lies in the stored bytes instead of building
/// them; `serde_json` reads each value later, when the application asks for it.
mod read {
    use std::borrow::Cow;
    use std::fmt;

    use serde::Deserialize;
    use serde::de::{self, DeserializeSeed, MapAccess, Visitor};
    use serde_json::value::RawValue;

    use super::{DecodeError, SessionData, Text};
    use crate::config::Expiry;

    /// What the one-pass reader reads: the values, and the creation time if present.
    pub(super) type Plain = (Vec<(Text, Text)>, Option<u64>);

    pub(super) fn payload(s: &[u8]) -> Result<SessionData, DecodeError> {
        let text = std::str::from_utf8(s).map_err(|e| DecodeError::NotUtf8 {
            at: e.valid_up_to(),
        })?;
        if let Some((values, created)) = plain_values(s) {
            return Ok(SessionData {
                values,
                created,
                ..SessionData::default()
            });
        }
        general(text)
    }

    /// The whole grammar of the payload, with `serde_json`: for what [`plain_values`] leaves.
    pub(super) fn general(s: &str) -> Result<SessionData, DecodeError> {
        let mut de = serde_json::Deserializer::from_str(s);
        de::Deserializer::deserialize_map(&mut de, Payload { src: s })
            .and_then(|data| de.end().map(|()| data))
            .map_err(|e| DecodeError::json(&e))
    }

    /// The payload object: `d` (required), `f`, `x`, `c`, `o` and `l`, each at most once, and nothing
    /// else. Read with `deserialize_map`, so only an object: a derived struct would also take
    /// the array form (`[{}]`, found by the `record_decode` fuzzer).
    struct Payload<'a> {
        src: &'a str,
    }

    #[derive(Deserialize)]
    #[serde(field_identifier)]
    enum Field {
        #[serde(rename = "d")]
        Values,
        #[serde(rename = "f")]
        Flash,
        #[serde(rename = "x")]
        Expiry,
        #[serde(rename = "c")]
        Created,
        #[serde(rename = "o")]
        Owner,
        #[serde(rename = "l")]
        Label,
    }

    /// Fills an empty slot; a second value for it is a repeated field.
    fn once<T, E: de::Error>(slot: &mut Option<T>, field: &'static str, v: T) -> Result<(), E> {
        match slot.replace(v) {
            None => Ok(()),
            Some(_) => Err(E::duplicate_field(field)),
        }
    }

    impl<'de> Visitor<'de> for Payload<'de> {
        type Value = SessionData;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a session payload object")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SessionData, A::Error> {
            let (mut values, mut flash, mut expiry, mut created) = (None, None, None, None);
            let (mut owner, mut label) = (None, None);
            while let Some(field) = map.next_key()? {
                match field {
                    Field::Values => {
                        let v = map.next_value_seed(Values { src: self.src })?;
                        once(&mut values, "d", v)?;
                    }
                    Field::Flash => once(&mut flash, "f", map.next_value::<Vec<String>>()?)?,
                    Field::Expiry => once(&mut expiry, "x", map.next_value::<Expiry>()?)?,
                    Field::Created => once(&mut created, "c", map.next_value::<u64>()?)?,
                    Field::Owner => once(&mut owner, "o", map.next_value::<String>()?.into())?,
                    Field::Label => once(&mut label, "l", map.next_value::<String>()?.into())?,
                }
            }
            Ok(SessionData {
                values: values.ok_or_else(|| de::Error::missing_field("d"))?,
                flash: flash.unwrap_or_default(),
                expiry,
                created,
                owner,
                label,
                ..SessionData::default()
            })
        }
    }

    /// The object of session values: each value, and each key without escapes, as a range of
    /// `src`; a key with escapes, unescaped, on its own.
    struct Values<'a> {
        src: &'a str,
    }

    impl Values<'_> {
        fn text(&self, s: Cow<'_, str>) -> Text {
            if let Cow::Borrowed(part) = s {
                // serde_json lends slices of its input, which is `src`.
                let start = part.as_ptr().addr().wrapping_sub(self.src.as_ptr().addr());
                if self.src.get(start..start + part.len()) == Some(part) {
                    return Text::At(start, start + part.len());
                }
            }
            Text::Own(s.into())
        }
    }

    impl<'de> DeserializeSeed<'de> for Values<'de> {
        type Value = Vec<(Text, Text)>;

        fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }
    }

    impl<'de> Visitor<'de> for Values<'de> {
        type Value = Vec<(Text, Text)>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an object of session values")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut values = Vec::new();
            while let Some(KeyText(key)) = map.next_key()? {
                let value: &'de RawValue = map.next_value()?;
                values.push((self.text(key), self.text(Cow::Borrowed(value.get()))));
            }
            Ok(values)
        }
    }

    /// A key, borrowed from the input unless it had escapes.
    struct KeyText<'a>(Cow<'a, str>);

    impl<'de> Deserialize<'de> for KeyText<'de> {
        fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct Key;
            impl<'de> Visitor<'de> for Key {
                type Value = KeyText<'de>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a string")
                }
                fn visit_borrowed_str<E>(self, s: &'de str) -> Result<KeyText<'de>, E> {
                    Ok(KeyText(Cow::Borrowed(s)))
                }
                fn visit_str<E>(self, s: &str) -> Result<KeyText<'de>, E> {
                    Ok(KeyText(Cow::Owned(s.to_owned())))
                }
            }
            d.deserialize_str(Key)
        }
    }

    /// The layout this crate writes for plain values, recognized in one pass: exactly
    /// `{"d":{"key":value,...}}`, or the same with `,"c":<digits>` before the last `}`, with
    /// keys and string values that need no escapes, and numbers or `true`/`false`/`null` as
    /// the other values. Anything else (whitespace, escapes, nested values, the other
    /// bookkeeping fields) answers `None` and goes to [`general`], which accepts everything
    /// this accepts, with the same ranges (a test checks it). The input is valid UTF-8 already.
    ///
    /// Kept by hand because it pays on every request that loads a session: with `serde_json`
    /// reading the benchmark's records instead, `/read` and `/counter` on the memory store cost
    /// about 1,890 more instructions each (`benches/callgrind.sh`: 15,520 -> 17,409 per `/read`,
    /// 12 % of the whole request; the session's part over a bare request, 5,390 -> 7,280).
    pub(super) fn plain_values(s: &[u8]) -> Option<Plain> {
        (Parser { s, pos: 0 }).plain_values()
    }

    struct Parser<'a> {
        s: &'a [u8],
        pos: usize,
    }

    impl Parser<'_> {
        fn plain_values(&mut self) -> Option<Plain> {
            const HEAD: &[u8] = b"{\"d\":{";
            if !self.s.starts_with(HEAD) {
                return None;
            }
            self.pos = HEAD.len();
            let mut values = Vec::new();
            if !self.eat(b'}') {
                loop {
                    let (key_start, key_end) = self.plain_string()?;
                    if self.next()? != b':' {
                        return None;
                    }
                    let start = self.pos;
                    match self.peek()? {
                        b'"' => {
                            self.plain_string()?;
                        }
                        b't' => self.literal(b"true")?,
                        b'f' => self.literal(b"false")?,
                        b'n' => self.literal(b"null")?,
                        b'-' | b'0'..=b'9' => self.number()?,
                        _ => return None,
                    }
                    values.push((Text::At(key_start, key_end), Text::At(start, self.pos)));
                    match self.next()? {
                        b',' => {}
                        b'}' => break,
                        _ => return None,
                    }
                }
            }
            let created = if self.s[self.pos..].starts_with(b",\"c\":") {
                self.pos += 5;
                let start = self.pos;
                let mut created = 0u64;
                while let Some(d @ b'0'..=b'9') = self.peek() {
                    created = created.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
                    self.pos += 1;
                }
                // At least one digit, and no leading zero (as JSON).
                let n = self.pos - start;
                if n == 0 || (n > 1 && self.s[start] == b'0') {
                    return None;
                }
                Some(created)
            } else {
                None
            };
            (self.next() == Some(b'}') && self.pos == self.s.len()).then_some((values, created))
        }

        /// A string without escapes or control bytes: the range of its content.
        fn plain_string(&mut self) -> Option<(usize, usize)> {
            if self.next()? != b'"' {
                return None;
            }
            let start = self.pos;
            let end = start
                + self.s[start..]
                    .iter()
                    .position(|&b| matches!(b, b'"' | b'\\' | 0..0x20))?;
            if self.s[end] != b'"' {
                return None;
            }
            self.pos = end + 1;
            Some((start, end))
        }

        fn peek(&self) -> Option<u8> {
            self.s.get(self.pos).copied()
        }

        fn next(&mut self) -> Option<u8> {
            let b = self.peek()?;
            self.pos += 1;
            Some(b)
        }

        /// Whether the next byte is `b`, and if so steps over it.
        fn eat(&mut self, b: u8) -> bool {
            let here = self.peek() == Some(b);
            self.pos += usize::from(here);
            here
        }

        fn literal(&mut self, word: &'static [u8]) -> Option<()> {
            self.s[self.pos..]
                .starts_with(word)
                .then(|| self.pos += word.len())
        }

        fn digits(&mut self) -> usize {
            let n = self.s[self.pos..]
                .iter()
                .take_while(|b| b.is_ascii_digit())
                .count();
            self.pos += n;
            n
        }

        /// A number as JSON writes it: `-`, an integer without leading zeros, a fraction, an
        /// exponent.
        fn number(&mut self) -> Option<()> {
            self.eat(b'-');
            match self.next()? {
                b'0' => {}
                b'1'..=b'9' => {
                    self.digits();
                }
                _ => return None,
            }
            if self.eat(b'.') && self.digits() == 0 {
                return None;
            }
            if self.eat(b'e') || self.eat(b'E') {
                if !self.eat(b'+') {
                    self.eat(b'-');
                }
                if self.digits() == 0 {
                    return None;
                }
            }
            Some(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Expiry;

    fn raw(s: &str) -> Arc<str> {
        s.into()
    }

    fn decode(bytes: &[u8], max: usize) -> Result<SessionData, DecodeError> {
        SessionData::decode(&Bytes::copy_from_slice(bytes), max)
    }

    #[test]
    fn exact_lengths_count_the_creation_time_digits() {
        for created in [0, 9, 10, 99, 1_733_050_000_000, u64::MAX] {
            assert_eq!(decimal_len(created), created.to_string().len());
            let mut d = SessionData::default();
            d.set("k", raw("1"));
            d.created = Some(created);
            assert_eq!(d.exact_len(), Some(d.encode().len()), "{created}");
            let back = SessionData::decode(&d.encode(), 1 << 20).unwrap();
            assert_eq!(back.created, Some(created));
        }
    }

    #[test]
    fn round_trip() {
        let mut d = SessionData::default();
        d.set("count", raw("5"));
        d.set("name", raw(r#""a/b?c%d#e \"q\"\n é""#));
        d.set_flash("message", raw(r#""Saved!""#));
        d.created = Some(1_900_000_000_000);
        d.owner = Some("user \"42\"".into());
        d.label = Some("Firefox".into());
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
            assert!(decode(bad, 1 << 20).is_err(), "{bad:?}");
        }
        // A value is kept raw however deep it nests (serde_json skips it without recursion);
        // reading it is serde_json's, which refuses more than 127 levels without overflowing.
        let nested = |n: usize| format!("{{\"d\":{{\"a\":{}{}}}}}", "[".repeat(n), "]".repeat(n));
        let ok = decode(nested(127).as_bytes(), 1 << 20).unwrap();
        assert!(serde_json::from_str::<serde_json::Value>(ok.get("a").unwrap()).is_ok());
        let deep = decode(nested(100_000).as_bytes(), 1 << 20).unwrap();
        assert!(serde_json::from_str::<serde_json::Value>(deep.get("a").unwrap()).is_err());
        // Deep nesting in the record's own structure is refused.
        for deep in [
            format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)),
            format!(
                "{{\"d\":{{}},\"x\":{}{}}}",
                "[".repeat(100_000),
                "]".repeat(100_000)
            ),
            format!(
                "{{\"d\":{{}},\"f\":{}{}}}",
                "[".repeat(100_000),
                "]".repeat(100_000)
            ),
        ] {
            assert!(decode(deep.as_bytes(), 1 << 20).is_err());
        }
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

    /// How many keys the top-level object has, duplicates included.
    fn top_level_keys(input: &[u8]) -> usize {
        struct Count;
        impl<'de> serde::de::Visitor<'de> for Count {
            type Value = usize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<usize, A::Error> {
                let mut n = 0;
                while map
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {
                    n += 1;
                }
                Ok(n)
            }
        }
        let mut de = serde_json::Deserializer::from_slice(input);
        serde::Deserializer::deserialize_map(&mut de, Count).unwrap_or(0)
    }

    /// The decoder (the one-pass reader, then `serde_json`) against `serde_json::Value` on mutated
    /// payloads: whatever it accepts is JSON with the same values, and whatever `serde_json`
    /// reads as a payload it accepts too.
    /// `count` inputs: the seeds in turn, each with fewer than `max_edits` random one-byte
    /// replacements, removals or insertions of JSON-ish bytes (a fixed xorshift sequence).
    #[allow(clippy::cast_possible_truncation)] // random indices from a u64
    fn mutants<'a>(
        seeds: &'a [&'a [u8]],
        count: usize,
        max_edits: u64,
        mut rng: u64,
    ) -> impl Iterator<Item = Vec<u8>> + 'a {
        let alphabet = b"{}[]\",:\\ 0123456789.eE+-tfnulrsadx\x01\xc3\xa9";
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        (0..count).map(move |i| {
            let mut input = seeds[i % seeds.len()].to_vec();
            for _ in 0..(next() % max_edits) {
                let at = (next() as usize) % (input.len() + 1);
                let b = alphabet[(next() as usize) % alphabet.len()];
                match next() % 3 {
                    0 if at < input.len() => input[at] = b,
                    1 if at < input.len() => {
                        input.remove(at);
                    }
                    _ => input.insert(at, b),
                }
            }
            input
        })
    }

    #[test]
    fn agrees_with_serde_json() {
        let seeds: [&[u8]; 6] = [
            br#"{"d":{"count":1,"name":"ada","l":[1,2.5e-3,{"x":null}],"t":true}}"#,
            br#"{"d":{"a\u00e9\n":"\"q\"","b":-0.0,"c":{}},"f":["b"],"c":1700000000000}"#,
            br#" { "d" : { } , "x" : {"i":1000} } "#,
            br#"{"d":{"e":[],"f":[[[]]],"g":"\ud83e\udd80 zurich"}}"#,
            br#"{"d":{"n":123456789012345678901234567890,"m":1E+2}}"#,
            "{\"d\":{\"ü\":\"東京\"}}".as_bytes(),
        ];
        for input in mutants(&seeds, 60_000, 4, 0x2545_f491_4f6c_dd1d) {
            let ours = decode(&input, 1 << 20);
            let theirs = serde_json::from_slice::<serde_json::Value>(&input);
            // A number too large for an f64 is valid JSON that serde_json's Value cannot hold,
            // and a `\u` escape of half a surrogate pair is well-formed JSON that no Rust
            // string can hold: values are kept raw (as serde_json's `RawValue` keeps them), and
            // reading such a value fails then. The known differences.
            if theirs.as_ref().is_err_and(|e| {
                let e = e.to_string();
                // serde_json's words for half a surrogate pair: "lone leading surrogate in hex
                // escape", or "unexpected end of hex escape" when no `\u` follows it.
                ["number out of range", "surrogate", "end of hex escape"]
                    .iter()
                    .any(|m| e.contains(m))
            }) {
                continue;
            }
            let payload_shape = theirs.as_ref().ok().and_then(|v| {
                let obj = v.as_object()?;
                let known = obj
                    .keys()
                    .all(|k| ["d", "f", "x", "c"].contains(&k.as_str()));
                let flash_ok = obj
                    .get("f")
                    .is_none_or(|f| serde_json::from_value::<Vec<String>>(f.clone()).is_ok());
                let expiry_ok = obj
                    .get("x")
                    .is_none_or(|x| serde_json::from_value::<Expiry>(x.clone()).is_ok());
                let deadline_ok = obj.get("c").is_none_or(|c| c.as_u64().is_some());
                (known && obj.get("d")?.is_object() && flash_ok && expiry_ok && deadline_ok)
                    .then(|| obj["d"].as_object().cloned())
                    .flatten()
            });
            match (&ours, &payload_shape) {
                (Ok(data), Some(values)) => {
                    // serde_json keeps the last of duplicate keys, as we do.
                    assert_eq!(
                        data.len(),
                        values.len(),
                        "{:?}",
                        String::from_utf8_lossy(&input)
                    );
                    for (k, v) in values {
                        let raw = data.get(k).expect("same keys");
                        let back: serde_json::Value = serde_json::from_str(raw).unwrap();
                        assert_eq!(&back, v, "{:?}", String::from_utf8_lossy(&input));
                    }
                }
                (Err(_), None) => {}
                (Ok(_), None) => {
                    // We may only accept what serde_json also reads as a payload, except that
                    // duplicate bookkeeping fields are refused by us, never accepted.
                    panic!(
                        "accepted what serde_json refuses: {:?}",
                        String::from_utf8_lossy(&input)
                    );
                }
                (Err(e), Some(_)) => {
                    // Refusing is allowed only for repeated bookkeeping fields (serde_json's
                    // Value silently keeps the last one).
                    let text = String::from_utf8_lossy(&input);
                    assert!(
                        top_level_keys(&input)
                            > theirs.as_ref().unwrap().as_object().unwrap().len(),
                        "refused a valid payload ({e}): {text:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_one_pass_reader_accepts_only_what_the_general_one_does_with_the_same_ranges() {
        let seeds: [&[u8]; 6] = [
            br#"{"d":{"count":12,"name":"ada"},"c":1733050000000}"#,
            br#"{"d":{"count":12,"name":"ada","t":true,"f":false,"n":null}}"#,
            br#"{"d":{"a":-0.5e+3,"b":0,"c":1E-2,"":"","z":"x y"}}"#,
            br#"{"d":{}}"#,
            "{\"d\":{\"ü\":\"東京\",\"k\":7}}".as_bytes(),
            br#"{"d":{"b":1,"a":2,"a":3},"c":1733050000000}"#,
        ];
        let (mut plain, mut general) = (0, 0);
        for input in mutants(&seeds, 100_000, 3, 0x9e37_79b9_7f4a_7c15) {
            if std::str::from_utf8(&input).is_err() {
                continue;
            }
            let text = String::from_utf8_lossy(&input);
            let Some((fast, created)) = read::plain_values(&input) else {
                general += 1;
                continue;
            };
            plain += 1;
            let full = read::general(&text)
                .unwrap_or_else(|e| panic!("one-pass reader accepted {text:?}, refused: {e}"));
            let ranges = |v: &[(Text, Text)]| -> Vec<(Vec<u8>, Vec<u8>)> {
                v.iter()
                    .map(|(k, v)| {
                        (
                            text_bytes(&input, k).to_vec(),
                            text_bytes(&input, v).to_vec(),
                        )
                    })
                    .collect()
            };
            assert_eq!(ranges(&fast), ranges(&full.values), "{text:?}");
            assert!(full.flash.is_empty() && full.expiry.is_none());
            assert_eq!(created, full.created, "{text:?}");
        }
        // Both paths were exercised.
        assert!(
            plain > 10_000 && general > 10_000,
            "{plain} one-pass, {general} general"
        );
    }

    #[test]
    fn the_one_pass_reader_stops_at_the_first_special_byte_in_a_string() {
        let specials = [b'"', b'\\', 0x00, 0x1f, 0x0a];
        let fillers = [b'a', b' ', 0x7f, b'!', b'#', b'[', 0x20];
        let record = |value: &[u8]| [&b"{\"d\":{\"k\":\""[..], value, b"\"}}"].concat();
        for len in 0..40 {
            for &f in &fillers {
                let plain = vec![f; len];
                let (values, _) = read::plain_values(&record(&plain)).unwrap();
                let Text::At(start, end) = values[0].1 else {
                    panic!("a range")
                };
                assert_eq!(end - start, len + 2, "the value with its quotes");
                for at in 0..len {
                    for &sp in &specials {
                        let mut v = plain.clone();
                        v[at] = sp;
                        assert!(read::plain_values(&record(&v)).is_none(), "{v:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn half_a_surrogate_pair_is_kept_raw_in_a_value_and_refused_in_a_key() {
        let d = decode(br#"{"d":{"a":"\ud800","b":1}}"#, 1000).unwrap();
        assert!(serde_json::from_str::<String>(d.get("a").unwrap()).is_err());
        assert_eq!(d.get("b"), Some("1"));
        assert!(decode(br#"{"d":{"\ud800":1}}"#, 1000).is_err());
    }

    #[test]
    fn dangling_flash_keys_are_dropped() {
        let d = decode(br#"{"d":{"a":1},"f":["a","b","a"]}"#, 1000).unwrap();
        assert_eq!(d.flash, vec!["a".to_owned()]);
    }
}
