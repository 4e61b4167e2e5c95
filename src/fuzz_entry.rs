//! Entry points for the fuzz targets under `fuzz/` and for the seed replay test
//! (`tests/fuzz_seeds.rs`).
//!
//! **Not part of the public API**: hidden from the docs, outside semver, changed at will. It is
//! public only because the fuzz targets and integration tests are separate crates.
//!
//! Each function feeds arbitrary bytes to one parser of untrusted input, exactly as the
//! middleware calls it, and checks that parser's invariants. A violated invariant panics, which
//! is what the fuzzer reports as a crash. None of them allocates more than a small multiple of
//! its input.

use bytes::Bytes;
use http::header::COOKIE;
use http::{HeaderMap, HeaderValue};

use crate::cookie::{CookieLookup, find_in_header, find_session_id};
use crate::id::Id;
use crate::service::DEFAULT_MAX_RECORD_BYTES;
use crate::session::payload::{DecodeError, SessionData};
use crate::sign::Keys;

/// The cookie names the `cookie_header` target looks up: the short default style, and a
/// prefixed one (so near-miss prefixes such as `Host-id` or `__host-id` are exercised).
const COOKIE_NAMES: [&str; 2] = ["id", "__Host-id"];

/// A valid id, used as the value of the junk cookies that must be ignored.
const VALID_ID: &str = "6ba7b810-9dad-41d1-80b4-00c04fd430c8";

/// The byte that separates Cookie header values in a `cookie_header` input. A line feed can
/// never be part of a header value, so every split is a candidate header.
pub const HEADER_SEPARATOR: u8 = b'\n';

/// The layer's cookie lookup as it runs on every request, for `benches/micro.rs`: whether the
/// headers carry a valid session id under `name`.
pub fn find_session(headers: &http::HeaderMap, name: &str) -> bool {
    matches!(find_session_id(headers, name, None), CookieLookup::Found(_))
}

/// The layer's cookie lookup with signing keys, for `benches/micro.rs`: the keys' MAC keys are
/// derived once, as a layer derives them at build.
#[derive(Debug)]
pub struct SignedLookup(Keys);

impl SignedLookup {
    /// The lookup of a layer with these signing keys (the first current).
    ///
    /// # Panics
    /// If a key is shorter than 32 bytes, or there is none.
    pub fn new(keys: &[[u8; 32]]) -> Self {
        let owned: Vec<Vec<u8>> = keys.iter().map(|k| k.to_vec()).collect();
        SignedLookup(Keys::new(&owned).unwrap().expect("at least one key"))
    }

    /// Whether the headers carry a session id under `name` signed with one of the keys.
    pub fn find(&self, headers: &http::HeaderMap, name: &str) -> bool {
        !matches!(
            find_session_id(headers, name, Some(&self.0)),
            CookieLookup::Absent | CookieLookup::Invalid
        )
    }

    /// The signed cookie value of `id` under the first key.
    pub fn sign(&self, name: &str, id: Id) -> String {
        String::from_utf8_lossy(&self.0.sign(name.as_bytes(), id)).into_owned()
    }
}

/// Cookie header bytes: `data` split on [`HEADER_SEPARATOR`] into header values, each looked
/// up with `find_in_header`, and those that are valid `HeaderValue`s (the only ones a
/// request can carry) looked up together with `find_session_id`, the middleware's function.
///
/// # Panics
/// When an invariant fails: a lookup differs from the documented rule (the first cookie with
/// the name whose trimmed value is a valid id wins; `Invalid` when cookies with the name exist
/// but none is valid), a found id does not display back to the exact bytes it was found as,
/// or the result changes when the cookies of other names are stripped, or when junk cookies of
/// other names (holding valid ids) are inserted between them.
pub fn cookie_header(data: &[u8]) {
    let pieces: Vec<&[u8]> = data.split(|&b| b == HEADER_SEPARATOR).collect();
    let mut headers = HeaderMap::new();
    let mut valid: Vec<&[u8]> = Vec::new();
    for &piece in &pieces {
        if let Ok(value) = HeaderValue::from_bytes(piece) {
            headers.append(COOKIE, value);
            valid.push(piece);
        }
    }

    for name in COOKIE_NAMES {
        for &piece in &pieces {
            let got = find_in_header(piece, name.as_bytes(), None);
            assert_eq!(
                got,
                expected_in_header(piece, name.as_bytes()),
                "find_in_header({piece:?}, {name:?})"
            );
        }

        let got = find_session_id(&headers, name, None);
        let expected = valid
            .iter()
            .map(|h| expected_in_header(h, name.as_bytes()))
            .fold(CookieLookup::Absent, |acc, one| match (acc, one) {
                (CookieLookup::Found(id), _) | (_, CookieLookup::Found(id)) => {
                    CookieLookup::Found(id)
                }
                (CookieLookup::Invalid, _) | (_, CookieLookup::Invalid) => CookieLookup::Invalid,
                _ => CookieLookup::Absent,
            });
        assert_eq!(got, expected, "find_session_id over {valid:?}, {name:?}");

        let stripped = rebuild(&valid, name, &[]);
        assert_eq!(
            find_session_id(&stripped, name, None),
            got,
            "stripping other cookies changed the lookup of {name:?} in {valid:?}"
        );
        let junk = junk_cookies(name);
        let junk: Vec<&[u8]> = junk.iter().map(Vec::as_slice).collect();
        let padded = rebuild(&valid, name, &junk);
        assert_eq!(
            find_session_id(&padded, name, None),
            got,
            "junk cookies of other names changed the lookup of {name:?} in {valid:?}"
        );
    }
}

/// The lookup rule for one header, written plainly; also checks that a found id displays as
/// the bytes it was found as.
fn expected_in_header(header: &[u8], name: &[u8]) -> CookieLookup {
    let mut lookup = CookieLookup::Absent;
    for pair in header.split(|&b| b == b';') {
        let Some(eq) = pair.iter().position(|&b| b == b'=') else {
            continue;
        };
        if trim_ows(&pair[..eq]) != name {
            continue;
        }
        let value = trim_ows(&pair[eq + 1..]);
        match Id::parse_bytes(value) {
            Ok(id) => {
                assert_eq!(
                    id.to_string().as_bytes(),
                    value,
                    "found id does not display as the bytes it was found as"
                );
                assert_eq!(Id::parse_bytes(id.to_string().as_bytes()), Ok(id));
                return CookieLookup::Found(id);
            }
            Err(_) => lookup = CookieLookup::Invalid,
        }
    }
    lookup
}

/// Spaces and tabs trimmed from both ends.
fn trim_ows(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&b| b != b' ' && b != b'\t');
    let Some(start) = start else { return &[] };
    let end = s
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .unwrap_or(start);
    &s[start..=end]
}

/// Cookies whose names are near misses of `name`; each must be ignored by its lookup.
fn junk_cookies(name: &str) -> Vec<Vec<u8>> {
    let upper = name.to_ascii_uppercase();
    let other = COOKIE_NAMES
        .iter()
        .find(|n| **n != name)
        .copied()
        .unwrap_or("sid");
    [
        format!("x{name}={VALID_ID}"),
        format!("{name}x={VALID_ID}"),
        format!("{upper}={VALID_ID}"),
        format!("{other}={VALID_ID}"),
        format!("{name} {name}={VALID_ID}"),
        format!("\"{name}\"={VALID_ID}"),
        format!("={VALID_ID}"),
        name.to_owned(),
        format!(" {VALID_ID} "),
        String::new(),
    ]
    .into_iter()
    .map(String::into_bytes)
    .collect()
}

/// The headers with only the cookies named `name` kept (pairs without `=` dropped), and the
/// `junk` cookies inserted before each kept cookie, at the end of each header, and as whole
/// headers before and after the others.
fn rebuild(headers: &[&[u8]], name: &str, junk: &[&[u8]]) -> HeaderMap {
    let mut out = HeaderMap::new();
    let all_junk = junk.join(&b';');
    let mut push = |bytes: &[u8]| {
        let value = HeaderValue::from_bytes(bytes).expect("rebuilt from valid header bytes");
        out.append(COOKIE, value);
    };
    if !junk.is_empty() {
        push(&all_junk);
    }
    for (i, header) in headers.iter().enumerate() {
        let mut parts: Vec<&[u8]> = Vec::new();
        for pair in header.split(|&b| b == b';') {
            let named = pair
                .iter()
                .position(|&b| b == b'=')
                .is_some_and(|eq| trim_ows(&pair[..eq]) == name.as_bytes());
            if named {
                if !junk.is_empty() {
                    parts.push(junk[i % junk.len()]);
                }
                parts.push(pair);
            }
        }
        if !junk.is_empty() {
            parts.push(&all_junk);
        }
        push(&parts.join(&b';'));
    }
    if !junk.is_empty() {
        push(&all_junk);
    }
    out
}

/// The signing keys of the `signed_cookie` target, current first: the committed seeds hold
/// values signed with them (and with [`UNKNOWN_KEY`]).
pub const SIGNING_KEYS: [[u8; 32]; 2] = [[0x11; 32], [0x22; 32]];

/// A key the `signed_cookie` target's layer does not list.
pub const UNKNOWN_KEY: [u8; 32] = [0x33; 32];

/// Cookie header bytes as in [`cookie_header`], looked up by a layer with signing keys
/// ([`SIGNING_KEYS`]: the first current, the second older).
///
/// # Panics
/// When an invariant fails: a lookup (`find_in_header` per header, `find_session_id` over the
/// valid ones) differs from the rule written plainly here, with its own MAC: the first cookie
/// with the name whose trimmed value is `<id>.<mac>`, a canonical id and the unpadded
/// base64url of the keyed BLAKE3 of `"<name>=<id>"` (its first 16 bytes) under a listed key,
/// wins (`Found` for the
/// first key, `FoundOlderKey` for the other); `Invalid` when cookies with the name exist but
/// none verifies. Also: a found value is byte for byte what the layer signs for that id (one
/// accepted spelling per id and key), and a layer listing only the older key finds, as
/// current, what the reference finds with that key alone (the cookie found as older included).
pub fn signed_cookie(data: &[u8]) {
    let listed: Vec<Vec<u8>> = SIGNING_KEYS.iter().map(|k| k.to_vec()).collect();
    let keys = Keys::new(&listed).unwrap().expect("keys");
    let older_only = Keys::new(&listed[1..]).unwrap().expect("keys");
    let pieces: Vec<&[u8]> = data.split(|&b| b == HEADER_SEPARATOR).collect();
    let mut headers = HeaderMap::new();
    let mut valid: Vec<&[u8]> = Vec::new();
    for &piece in &pieces {
        if let Ok(value) = HeaderValue::from_bytes(piece) {
            headers.append(COOKIE, value);
            valid.push(piece);
        }
    }
    for name in COOKIE_NAMES {
        for &piece in &pieces {
            let got = find_in_header(piece, name.as_bytes(), Some(&keys));
            assert_eq!(
                got,
                expected_signed(piece, name, &SIGNING_KEYS),
                "find_in_header({piece:?}, {name:?}) with keys"
            );
            // Rotation: a layer that lists only the older key finds, as current, the first
            // cookie it signed; in particular the one found as older above.
            let older = find_in_header(piece, name.as_bytes(), Some(&older_only));
            assert_eq!(older, expected_signed(piece, name, &SIGNING_KEYS[1..]));
            if let CookieLookup::FoundOlderKey(id) = got {
                assert_eq!(
                    older,
                    CookieLookup::Found(id),
                    "rotation lost an older cookie"
                );
            }
        }
        let got = find_session_id(&headers, name, Some(&keys));
        let expected = valid
            .iter()
            .map(|h| expected_signed(h, name, &SIGNING_KEYS))
            .find(|l| matches!(l, CookieLookup::Found(_) | CookieLookup::FoundOlderKey(_)))
            .unwrap_or_else(|| {
                if valid
                    .iter()
                    .any(|h| expected_signed(h, name, &SIGNING_KEYS) == CookieLookup::Invalid)
                {
                    CookieLookup::Invalid
                } else {
                    CookieLookup::Absent
                }
            });
        assert_eq!(
            got, expected,
            "find_session_id with keys over {valid:?}, {name:?}"
        );
    }
}

/// The signed lookup rule for one header, written plainly with a fresh MAC per key and the
/// MAC compared as text; also checks that [`Keys::sign`] makes exactly the value found.
fn expected_signed(header: &[u8], name: &str, keys: &[[u8; 32]]) -> CookieLookup {
    use base64::Engine as _;

    let mut lookup = CookieLookup::Absent;
    for pair in header.split(|&b| b == b';') {
        let Some(eq) = pair.iter().position(|&b| b == b'=') else {
            continue;
        };
        if trim_ows(&pair[..eq]) != name.as_bytes() {
            continue;
        }
        lookup = CookieLookup::Invalid;
        let value = trim_ows(&pair[eq + 1..]);
        let Some(dot) = value.iter().position(|&b| b == b'.') else {
            continue;
        };
        let Ok(id) = Id::parse_bytes(&value[..dot]) else {
            continue;
        };
        for (i, key) in keys.iter().enumerate() {
            let mac_key = blake3::derive_key(crate::sign::KEY_CONTEXT, key);
            let mac = blake3::keyed_hash(&mac_key, format!("{name}={id}").as_bytes());
            let tag =
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&mac.as_bytes()[..16]);
            if value[dot + 1..] == *tag.as_bytes() {
                let owned: Vec<Vec<u8>> = vec![key.to_vec()];
                let signer = Keys::new(&owned).unwrap().expect("a key");
                assert_eq!(
                    &signer.sign(name.as_bytes(), id)[..],
                    value,
                    "the value found is not what the layer signs"
                );
                return if i == 0 {
                    CookieLookup::Found(id)
                } else {
                    CookieLookup::FoundOlderKey(id)
                };
            }
        }
    }
    lookup
}

/// Session id text: [`Id::parse_bytes`] (and `FromStr` for UTF-8 input).
///
/// # Panics
/// When an invariant fails: parse → display → parse is not the identity, an accepted input
/// is not displayed byte for byte as it came in (only the canonical form is accepted), the
/// `&str` and `&[u8]` parsers disagree, or the parser disagrees with the `uuid` crate about
/// what a canonical (lowercase, hyphenated, version 4, RFC 4122 variant) UUID is.
pub fn session_id(data: &[u8]) {
    let parsed = Id::parse_bytes(data);
    if let Ok(text) = std::str::from_utf8(data) {
        assert_eq!(
            text.parse::<Id>(),
            parsed,
            "FromStr and parse_bytes disagree"
        );
    }

    let canonical = uuid::Uuid::try_parse_ascii(data).is_ok_and(|u| {
        u.get_version_num() == 4
            && u.get_variant() == uuid::Variant::RFC4122
            && u.hyphenated().to_string().as_bytes() == data
    });
    assert_eq!(
        parsed.is_ok(),
        canonical,
        "parse_bytes disagrees with uuid on {data:?}"
    );

    if let Ok(id) = parsed {
        let text = id.to_string();
        assert_eq!(text.as_bytes(), data, "accepted a non-canonical form");
        assert_eq!(text.parse::<Id>(), Ok(id), "parse(display(id)) != id");
        assert_eq!(
            uuid::Uuid::from_bytes(id.to_bytes())
                .hyphenated()
                .to_string(),
            text,
            "to_bytes and Display disagree"
        );
    }
}

/// Stored record bytes, through the decoders a load runs: with the Redis family compiled in
/// (feature `redis` or `webdis`), the bytes as a Redis value (`GET`'s reply) through the
/// family's value decoder, and then its payload, as the layer decodes it; and the bytes as a
/// payload themselves (what the other stores keep), through `SessionData::decode` (crate-private)
/// with the layer's default limit ([`DEFAULT_MAX_RECORD_BYTES`]) and with limits just below and
/// at the input's length.
///
/// # Panics
/// When an invariant fails. The Redis value: a decoded value whose expiry Redis accepts does
/// not re-encode to exactly the input (the layout has one canonical form), its payload is not
/// the input's tail, or a value the header parser accepts is refused for anything but its
/// length. The payload: input over the limit is not refused as too large (whatever it
/// holds, so before parsing), the result depends on the limit once the input fits, or a
/// decoded record does not survive decode → encode → decode unchanged, encode is not stable,
/// or the re-encoded record is longer than the bytes it was decoded from (a record that
/// loaded within the limit must save within it).
pub fn record_decode(data: &[u8]) {
    #[cfg(any(feature = "redis", feature = "webdis"))]
    if let Some(payload) = redis_value(data) {
        payload_decode(&payload);
    }
    payload_decode(data);
}

/// The Redis family's value decoder on `data`; its payload if it decodes.
#[cfg(any(feature = "redis", feature = "webdis"))]
fn redis_value(data: &[u8]) -> Option<Bytes> {
    use crate::store::redis::value::{self, Header, MAX_EXPIRES_MS, Malformed};

    let head = value::parse_head(data);
    let decoded = value::decode(Bytes::copy_from_slice(data));
    let stored = match (head, decoded) {
        (Ok(head), Ok(stored)) => {
            assert_eq!(
                head, stored.head,
                "the header parser and the decoder disagree"
            );
            stored
        }
        (Ok(head), Err(e)) => {
            assert!(
                matches!(e, Malformed::Truncated { said, got } if said == head.payload_len && got == data.len() - head.len),
                "a value whose header parses was refused for {e:?}"
            );
            return None;
        }
        (Err(a), Err(b)) => {
            assert_eq!(a, b, "the header parser and the decoder disagree");
            return None;
        }
        (Err(e), Ok(_)) => panic!("the decoder accepted a header the parser refused: {e:?}"),
    };
    assert!(
        data.ends_with(&stored.payload),
        "the payload is not the value's tail"
    );
    let head = stored.head;
    if (1..=MAX_EXPIRES_MS).contains(&head.expires_ms) {
        let header = Header::new(
            head.version,
            head.expires_ms,
            head.token,
            stored.payload.len(),
            stored.owner.as_deref(),
        );
        let mut again = header.as_bytes().to_vec();
        again.extend_from_slice(&stored.payload);
        assert_eq!(again, data, "decode → encode is not the identity");
    }
    Some(stored.payload)
}

/// The payload decoder's invariants (see [`record_decode`]).
fn payload_decode(data: &[u8]) {
    let stored = Bytes::copy_from_slice(data);
    let decoded = SessionData::decode(&stored, DEFAULT_MAX_RECORD_BYTES);
    if data.len() > DEFAULT_MAX_RECORD_BYTES {
        assert!(
            matches!(decoded, Err(DecodeError::TooLarge { .. })),
            "input over the default limit not refused as too large"
        );
        return;
    }
    if let Some(below) = data.len().checked_sub(1) {
        assert!(
            matches!(
                SessionData::decode(&stored, below),
                Err(DecodeError::TooLarge { len, max }) if len == data.len() && max == below
            ),
            "input one byte over the limit not refused as too large"
        );
    }
    let exact = SessionData::decode(&stored, data.len());
    match (&decoded, &exact) {
        (Ok(a), Ok(b)) => assert!(a.same_as(b), "result depends on the limit"),
        (
            Err(DecodeError::Json { .. } | DecodeError::NotUtf8 { .. }),
            Err(DecodeError::Json { .. } | DecodeError::NotUtf8 { .. }),
        ) => {}
        _ => panic!("result depends on the limit: {decoded:?} vs {exact:?}"),
    }

    let Ok(data1) = decoded else { return };
    let bytes1 = data1.encode();
    assert!(
        bytes1.len() <= data.len(),
        "re-encoding grew the record from {} to {} bytes",
        data.len(),
        bytes1.len()
    );
    let data2 = match SessionData::decode(&bytes1, bytes1.len()) {
        Ok(d) => d,
        Err(e) => panic!("encoded record does not decode: {e:?}"),
    };
    assert!(data2.same_as(&data1), "decode(encode(x)) != x");
    let bytes2 = data2.encode();
    assert_eq!(bytes2, bytes1, "encode is not stable");
    // Flash keys are kept only for present values, sorted and unique.
    assert!(data1.flash.iter().all(|k| data1.contains(k)));
    assert!(data1.flash.windows(2).all(|w| w[0] < w[1]));
}

/// The Webdis reply parser, as the Webdis store calls it.
#[cfg(feature = "webdis")]
pub use crate::store::redis::webdis::reply::{Reply, ReplyError, parse_reply};

/// The commands the Webdis store sends, one of which each fuzz input picks.
#[cfg(feature = "webdis")]
const WEBDIS_COMMANDS: [&str; 5] = ["GET", "EVALSHA", "EVAL", "DEL", "SCRIPT"];

/// A Webdis HTTP reply: the first byte picks the status (mostly 200), the second the command,
/// the rest is the body, through [`parse_reply`].
///
/// # Panics
/// When an invariant fails: a status other than 200 is accepted, an accepted body is not a
/// JSON object with exactly the command as its key, or an error's message is unbounded.
#[cfg(feature = "webdis")]
pub fn webdis_reply(data: &[u8]) {
    const STATUSES: [u16; 8] = [200, 200, 200, 200, 401, 403, 404, 503];
    let (status, command, body) = match data {
        [s, c, body @ ..] => (
            STATUSES[usize::from(*s) % STATUSES.len()],
            WEBDIS_COMMANDS[usize::from(*c) % WEBDIS_COMMANDS.len()],
            body,
        ),
        _ => (200, "EVALSHA", data),
    };
    match parse_reply(status, body, command) {
        Ok(_) => {
            assert_eq!(status, 200, "a non-200 status was accepted");
            let value: serde_json::Value =
                serde_json::from_slice(body).expect("an accepted body is JSON");
            let object = value.as_object().expect("an accepted body is an object");
            assert!(
                object.len() == 1 && object.contains_key(command),
                "an accepted body does not hold exactly the command's key"
            );
        }
        Err(e) => {
            // The message quotes at most a bounded snippet of the body.
            let message = e.to_string();
            assert!(message.len() < 1024, "unbounded error message");
        }
    }
}

/// RESP2 bytes from a Redis connection through the Redis store's reply parser
/// (`resp::parse`), as its own connection reads them.
///
/// # Panics
/// When an invariant fails: a reply is longer than its input, depends on the bytes after it,
/// holds a bulk string outside itself, or is seen in a strict prefix of itself (the reader
/// would act on half a reply); an incomplete input has a prefix that is not incomplete; an
/// error becomes a reply when more bytes arrive.
#[cfg(feature = "redis")]
pub fn resp_reply(data: &[u8]) {
    use crate::store::redis::resp::{Parsed, parse};

    fn within(parsed: &Parsed, len: usize) -> bool {
        match parsed {
            Parsed::Bulk(range) => range.start <= range.end && range.end <= len,
            Parsed::Array(items) => items.iter().all(|item| within(item, len)),
            _ => true,
        }
    }

    match parse(data) {
        Ok(Some((parsed, len))) => {
            assert!(len <= data.len(), "a reply longer than its input");
            assert!(within(&parsed, len), "a bulk string outside its reply");
            assert_eq!(
                parse(&data[..len]),
                Ok(Some((parsed, len))),
                "the reply depends on the bytes after it"
            );
            for cut in (0..len).rev().take(512) {
                assert_eq!(
                    parse(&data[..cut]),
                    Ok(None),
                    "a reply in a prefix of {cut} bytes"
                );
            }
        }
        Ok(None) => {
            if let Some(shorter) = data.len().checked_sub(1) {
                assert_eq!(
                    parse(&data[..shorter]),
                    Ok(None),
                    "a prefix is not incomplete"
                );
            }
        }
        Err(_) => {
            let mut more = data.to_vec();
            more.extend_from_slice(b"\r\n:1\r\n");
            assert!(
                parse(&more).is_err(),
                "more bytes turned an error into a reply"
            );
        }
    }
}
