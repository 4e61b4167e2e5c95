//! Finding the session cookie in a request and writing `Set-Cookie`.

use std::time::Duration;

use http::header::Entry;
use http::header::{CACHE_CONTROL, COOKIE, SET_COOKIE, VARY};
use http::{HeaderMap, HeaderValue};

use crate::config::Config;
use crate::id::{ID_LEN, Id};
use crate::sign::{Keys, SIGNED_LEN, Verified};

/// What the request's Cookie headers say about the session cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CookieLookup {
    /// No cookie with the session cookie's name.
    Absent,
    /// Cookies with the name, none of which holds a valid id (malformed or forged).
    Invalid,
    /// The first cookie with the name whose value is a valid id (with signing keys: signed
    /// with the current key).
    Found(Id),
    /// As `Found`, signed with an older key of the list: the response re-signs it when the
    /// session is loaded.
    FoundOlderKey(Id),
}

/// Finds the session id among every `Cookie` header of a request, without allocating.
///
/// The first cookie named `name` whose value is a valid id wins (browsers send the most
/// specific cookie first); other cookies, and cookies with invalid values, are ignored. With
/// `keys`, a valid value is a signed one ([`crate::sign`]) whose MAC verifies under one of them;
/// without, the bare id. Header values that are not UTF-8 are scanned as bytes.
pub(crate) fn find_session_id(
    headers: &HeaderMap,
    name: &str,
    keys: Option<&Keys>,
) -> CookieLookup {
    let mut lookup = CookieLookup::Absent;
    for value in headers.get_all(COOKIE) {
        match find_in_header(value.as_bytes(), name.as_bytes(), keys) {
            CookieLookup::Invalid => lookup = CookieLookup::Invalid,
            CookieLookup::Absent => {}
            found => return found,
        }
    }
    lookup
}

/// [`find_session_id`] for the bytes of one Cookie header value.
pub(crate) fn find_in_header(header: &[u8], name: &[u8], keys: Option<&Keys>) -> CookieLookup {
    let value_len = if keys.is_some() { SIGNED_LEN } else { ID_LEN };
    let mut lookup = CookieLookup::Absent;
    let mut rest = header;
    while !rest.is_empty() {
        let pair = trim_start(rest);
        // Cheap rejection first: the pair must start with the name.
        if let Some(after) = pair.strip_prefix(name)
            && let Some((b'=', value)) = trim_start(after).split_first()
        {
            let value = trim_start(value);
            // A value of the expected length followed by the end or the next pair (the usual
            // case) needs no scan for the `;`.
            let (value, next) = match value.get(value_len) {
                None if value.len() == value_len => (value, &[][..]),
                Some(b';') => (&value[..value_len], &value[value_len + 1..]),
                _ => split_pair(value),
            };
            let value = trim(value);
            match keys {
                None => match Id::parse_bytes(value) {
                    Ok(id) => return CookieLookup::Found(id),
                    Err(_) => lookup = CookieLookup::Invalid,
                },
                Some(keys) => match keys.verify(name, value) {
                    Verified::Current(id) => return CookieLookup::Found(id),
                    Verified::Older(id) => return CookieLookup::FoundOlderKey(id),
                    Verified::Invalid => lookup = CookieLookup::Invalid,
                },
            }
            rest = next;
        } else {
            rest = split_pair(pair).1;
        }
    }
    lookup
}

/// Splits at the first `;`: the pair before it and the rest after it.
fn split_pair(s: &[u8]) -> (&[u8], &[u8]) {
    match memchr::memchr(b';', s) {
        Some(end) => (&s[..end], &s[end + 1..]),
        None => (s, &[][..]),
    }
}

fn trim_start(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    s
}

fn trim(s: &[u8]) -> &[u8] {
    let mut s = trim_start(s);
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// What the response must say about the cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CookieAction {
    None,
    /// Set the cookie to this id; `Some(max_age)` for a persistent cookie.
    Set(Id, Option<Duration>),
    /// Remove the cookie.
    Remove,
}

const EXPIRED: &str = "; Max-Age=0; Expires=Thu, 01 Jan 1970 00:00:00 GMT";

/// Renders the `Set-Cookie` value for an action (`None` for [`CookieAction::None`]).
pub(crate) fn set_cookie_value(config: &Config, action: CookieAction) -> Option<HeaderValue> {
    let mut digits = itoa::Buffer::new();
    let (middle, tail): (&[u8], &[u8]) = match action {
        CookieAction::None => return None,
        CookieAction::Set(_, None) => (&[], &[]),
        CookieAction::Set(_, Some(max_age)) => {
            (b"; Max-Age=", digits.format(max_age.as_secs()).as_bytes())
        }
        CookieAction::Remove => (EXPIRED.as_bytes(), &[]),
    };
    let mut id_text = [0u8; ID_LEN];
    let signed;
    let id_text: &[u8] = match (action, &config.signing_keys) {
        (CookieAction::Set(id, _), None) => {
            id.encode(&mut id_text);
            &id_text
        }
        (CookieAction::Set(id, _), Some(keys)) => {
            signed = keys.sign(config.cookie_name.as_bytes(), id);
            &signed
        }
        (CookieAction::None | CookieAction::Remove, _) => &[],
    };
    let parts = [
        config.cookie_prefix.as_bytes(),
        id_text,
        config.cookie_attributes.as_bytes(),
        middle,
        tail,
    ];
    // Exactly sized, so the buffer becomes the header's bytes without another allocation.
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.len()).sum());
    for part in parts {
        out.extend_from_slice(part);
    }
    // The parts were validated when the layer was built.
    HeaderValue::from_maybe_shared(bytes::Bytes::from(out)).ok()
}

/// Adds the cookie header, plus `Vary: Cookie` and a `Cache-Control` that keeps shared caches
/// from storing a response that carries a session cookie.
pub(crate) fn apply(config: &Config, headers: &mut HeaderMap, action: CookieAction) {
    let Some(value) = set_cookie_value(config, action) else {
        return;
    };
    headers.append(SET_COOKIE, value);
    match headers.entry(VARY) {
        Entry::Vacant(e) => {
            e.insert(HeaderValue::from_static("Cookie"));
        }
        Entry::Occupied(mut e) => {
            let varies = e.iter().any(|v| {
                v.to_str().is_ok_and(|s| {
                    s.split(',')
                        .any(|t| t.trim() == "*" || t.trim().eq_ignore_ascii_case("cookie"))
                })
            });
            if !varies {
                e.append(HeaderValue::from_static("Cookie"));
            }
        }
    }
    match headers.entry(CACHE_CONTROL) {
        Entry::Vacant(e) => {
            e.insert(HeaderValue::from_static("private"));
        }
        Entry::Occupied(mut e) => match e.get().to_str().map(str::to_owned) {
            Err(_) => {
                e.insert(HeaderValue::from_static("private"));
            }
            Ok(cc) => {
                let lower = cc.to_ascii_lowercase();
                let private = lower.split(',').any(|t| {
                    let t = t.trim();
                    t == "private" || t == "no-store"
                });
                if !private && let Ok(v) = HeaderValue::from_str(&format!("{cc}, private")) {
                    e.insert(v);
                }
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&[u8]]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(COOKIE, HeaderValue::from_bytes(v).unwrap());
        }
        h
    }

    #[test]
    fn finds_the_id_among_other_cookies() {
        let id = Id::random();
        let h = headers(&[format!("a=1; id={id}; b=2").as_bytes()]);
        assert_eq!(find_session_id(&h, "id", None), CookieLookup::Found(id));
        let h = headers(&[b"a=1", format!("  id = {id} ").as_bytes()]);
        assert_eq!(find_session_id(&h, "id", None), CookieLookup::Found(id));
    }

    #[test]
    fn other_names_and_prefixes_do_not_match() {
        let id = Id::random();
        let h = headers(&[format!("xid={id}; idx={id}; ID={id}").as_bytes()]);
        assert_eq!(find_session_id(&h, "id", None), CookieLookup::Absent);
    }

    #[test]
    fn invalid_values_are_reported_and_skipped() {
        let id = Id::random();
        let h = headers(&[b"id=garbage; id=", format!("id={id}").as_bytes()]);
        assert_eq!(find_session_id(&h, "id", None), CookieLookup::Found(id));
        let h = headers(&[b"id=\"quoted\"; id=\xff\xfe"]);
        assert_eq!(find_session_id(&h, "id", None), CookieLookup::Invalid);
        let upper = id.to_string().to_uppercase();
        let h = headers(&[format!("id={upper}").as_bytes()]);
        assert_eq!(find_session_id(&h, "id", None), CookieLookup::Invalid);
    }

    #[test]
    fn signed_values_are_found_by_their_key() {
        let keys = |list: &[u8]| {
            let owned: Vec<Vec<u8>> = list.iter().map(|&b| vec![b; 32]).collect();
            Keys::new(&owned).unwrap().unwrap()
        };
        let (a, b) = (Id::random(), Id::random());
        let signed = |k: u8, id| String::from_utf8(keys(&[k]).sign(b"id", id).to_vec()).unwrap();
        let (a1, b2) = (signed(1, a), signed(2, b));
        let rotated = keys(&[2, 1]);
        // The fast path (value then `;`), the slow one (trailing space), and forged or unsigned
        // values before the valid one.
        let h = headers(&[format!("id={a1}; x=y").as_bytes()]);
        assert_eq!(
            find_session_id(&h, "id", Some(&rotated)),
            CookieLookup::FoundOlderKey(a)
        );
        let h = headers(&[format!("id={a}; id={}x; id={b2} ", &a1[..a1.len() - 1]).as_bytes()]);
        assert_eq!(
            find_session_id(&h, "id", Some(&rotated)),
            CookieLookup::Found(b)
        );
        let h = headers(&[format!("id={a}").as_bytes(), format!("id={a1}").as_bytes()]);
        assert_eq!(
            find_session_id(&h, "id", Some(&keys(&[2]))),
            CookieLookup::Invalid
        );
        // A signed value is not an id to an unsigned layer.
        assert_eq!(find_session_id(&h, "id", None), CookieLookup::Found(a));
        let h = headers(&[format!("id={a1}").as_bytes()]);
        assert_eq!(find_session_id(&h, "id", None), CookieLookup::Invalid);
    }

    #[test]
    fn duplicates_take_the_first_valid() {
        let (a, b) = (Id::random(), Id::random());
        let h = headers(&[format!("id={a}; id={b}").as_bytes()]);
        assert_eq!(find_session_id(&h, "id", None), CookieLookup::Found(a));
    }

    fn config() -> Config {
        let layer_cookie = crate::config::CookieSettings::default();
        let (cookie_prefix, cookie_attributes) = layer_cookie.render().unwrap();
        Config {
            cookie_name: "id".into(),
            cookie_prefix,
            cookie_attributes,
            expiry: crate::Expiry::default(),
            absolute_lifetime: None,
            max_record_bytes: 1000,
            max_save_attempts: 1,
            error_handler: std::sync::Arc::new(crate::config::default_error_handler),
            signing_keys: None,
        }
    }

    #[test]
    fn cache_headers_keep_shared_caches_out() {
        let config = config();
        let id = Id::random();
        let mut h = HeaderMap::new();
        apply(&config, &mut h, CookieAction::None);
        assert!(h.is_empty(), "no cookie, no headers");
        apply(
            &config,
            &mut h,
            CookieAction::Set(id, Some(Duration::from_secs(60))),
        );
        assert_eq!(h.get(VARY).unwrap(), "Cookie");
        assert_eq!(h.get(CACHE_CONTROL).unwrap(), "private");
        let value = h.get(SET_COOKIE).unwrap().to_str().unwrap();
        assert!(value.starts_with(&format!("id={id}; ")) && value.ends_with("; Max-Age=60"));

        let mut h = HeaderMap::new();
        h.insert(VARY, HeaderValue::from_static("Accept-Encoding, cookie"));
        h.insert(
            CACHE_CONTROL,
            HeaderValue::from_static("public, max-age=60"),
        );
        apply(&config, &mut h, CookieAction::Remove);
        assert_eq!(
            h.get_all(VARY).iter().count(),
            1,
            "Vary already named Cookie"
        );
        assert_eq!(h.get(CACHE_CONTROL).unwrap(), "public, max-age=60, private");

        let mut h = HeaderMap::new();
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        apply(&config, &mut h, CookieAction::Remove);
        assert_eq!(h.get(CACHE_CONTROL).unwrap(), "no-store");
    }

    #[test]
    fn huge_header_is_scanned_without_panic() {
        let big = "x=y; ".repeat(100_000);
        let h = headers(&[big.as_bytes()]);
        assert_eq!(find_session_id(&h, "id", None), CookieLookup::Absent);
    }
}
