//! Finding the session cookie in a request and writing `Set-Cookie`.

use std::time::Duration;

use http::header::{CACHE_CONTROL, COOKIE, SET_COOKIE, VARY};
use http::{HeaderMap, HeaderValue};

use crate::config::Config;
use crate::id::Id;

/// What the request's Cookie headers say about the session cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CookieLookup {
    /// No cookie with the session cookie's name.
    Absent,
    /// Cookies with the name, none of which holds a valid id (malformed or forged).
    Invalid,
    /// The first cookie with the name whose value is a valid id.
    Found(Id),
}

/// Finds the session id among every `Cookie` header of a request, without allocating.
///
/// The first cookie named `name` whose value parses as an [`Id`] wins (browsers send the most
/// specific cookie first); other cookies, and cookies with invalid values, are ignored. Header
/// values that are not UTF-8 are scanned as bytes.
pub fn find_session_id(headers: &HeaderMap, name: &str) -> CookieLookup {
    let mut lookup = CookieLookup::Absent;
    for value in headers.get_all(COOKIE) {
        match find_in_header(value.as_bytes(), name.as_bytes()) {
            CookieLookup::Found(id) => return CookieLookup::Found(id),
            CookieLookup::Invalid => lookup = CookieLookup::Invalid,
            CookieLookup::Absent => {}
        }
    }
    lookup
}

/// [`find_session_id`] for the bytes of one Cookie header value.
pub fn find_in_header(header: &[u8], name: &[u8]) -> CookieLookup {
    let mut lookup = CookieLookup::Absent;
    let mut rest = header;
    while !rest.is_empty() {
        // One `name=value` pair, up to the next `;`.
        let (pair, next) = match rest.iter().position(|&b| b == b';') {
            Some(end) => (&rest[..end], &rest[end + 1..]),
            None => (rest, &[][..]),
        };
        rest = next;
        let pair = trim_start(pair);
        // Cheap rejection first: the pair must start with the name.
        if pair.len() <= name.len() || !pair.starts_with(name) {
            continue;
        }
        let after = trim_start(&pair[name.len()..]);
        let Some((b'=', value)) = after.split_first() else {
            continue;
        };
        match Id::parse_bytes(trim(value)) {
            Ok(id) => return CookieLookup::Found(id),
            Err(_) => lookup = CookieLookup::Invalid,
        }
    }
    lookup
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
    if action == CookieAction::None {
        return None;
    }
    let mut out = String::with_capacity(
        config.cookie_prefix.len() + 36 + config.cookie_attributes.len() + EXPIRED.len(),
    );
    out.push_str(&config.cookie_prefix);
    match action {
        CookieAction::None => {}
        CookieAction::Set(id, max_age) => {
            let mut buf = [0u8; crate::id::ID_LEN];
            id.encode(&mut buf);
            out.push_str(std::str::from_utf8(&buf).ok()?);
            out.push_str(&config.cookie_attributes);
            if let Some(max_age) = max_age {
                out.push_str("; Max-Age=");
                push_decimal(&mut out, max_age.as_secs());
            }
        }
        CookieAction::Remove => {
            out.push_str(&config.cookie_attributes);
            out.push_str(EXPIRED);
        }
    }
    // The parts were validated when the layer was built.
    HeaderValue::from_maybe_shared(bytes::Bytes::from(out)).ok()
}

/// Appends `n` in decimal without the formatting machinery.
fn push_decimal(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        // `n % 10` is a single digit.
        #[allow(clippy::cast_possible_truncation)]
        let digit = (n % 10) as u8;
        digits[i] = b'0' + digit;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend(digits[i..].iter().map(|&d| char::from(d)));
}

/// Adds the cookie header, plus `Vary: Cookie` and a `Cache-Control` that keeps shared caches
/// from storing a response that carries a session cookie.
pub(crate) fn apply(config: &Config, headers: &mut HeaderMap, action: CookieAction) {
    let Some(value) = set_cookie_value(config, action) else {
        return;
    };
    headers.append(SET_COOKIE, value);
    let varies = headers.get_all(VARY).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|t| t.trim() == "*" || t.trim().eq_ignore_ascii_case("cookie"))
        })
    });
    if !varies {
        headers.append(VARY, HeaderValue::from_static("Cookie"));
    }
    match headers
        .get(CACHE_CONTROL)
        .map(|v| v.to_str().map(str::to_owned))
    {
        None | Some(Err(_)) => {
            headers.insert(CACHE_CONTROL, HeaderValue::from_static("private"));
        }
        Some(Ok(cc)) => {
            let lower = cc.to_ascii_lowercase();
            let private = lower.split(',').any(|t| {
                let t = t.trim();
                t == "private" || t == "no-store"
            });
            if !private {
                if let Ok(v) = HeaderValue::from_str(&format!("{cc}, private")) {
                    headers.insert(CACHE_CONTROL, v);
                }
            }
        }
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
        assert_eq!(find_session_id(&h, "id"), CookieLookup::Found(id));
        let h = headers(&[b"a=1", format!("  id = {id} ").as_bytes()]);
        assert_eq!(find_session_id(&h, "id"), CookieLookup::Found(id));
    }

    #[test]
    fn other_names_and_prefixes_do_not_match() {
        let id = Id::random();
        let h = headers(&[format!("xid={id}; idx={id}; ID={id}").as_bytes()]);
        assert_eq!(find_session_id(&h, "id"), CookieLookup::Absent);
    }

    #[test]
    fn invalid_values_are_reported_and_skipped() {
        let id = Id::random();
        let h = headers(&[b"id=garbage; id=", format!("id={id}").as_bytes()]);
        assert_eq!(find_session_id(&h, "id"), CookieLookup::Found(id));
        let h = headers(&[b"id=\"quoted\"; id=\xff\xfe"]);
        assert_eq!(find_session_id(&h, "id"), CookieLookup::Invalid);
        let upper = id.to_string().to_uppercase();
        let h = headers(&[format!("id={upper}").as_bytes()]);
        assert_eq!(find_session_id(&h, "id"), CookieLookup::Invalid);
    }

    #[test]
    fn duplicates_take_the_first_valid() {
        let (a, b) = (Id::random(), Id::random());
        let h = headers(&[format!("id={a}; id={b}").as_bytes()]);
        assert_eq!(find_session_id(&h, "id"), CookieLookup::Found(a));
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
        assert_eq!(find_session_id(&h, "id"), CookieLookup::Absent);
    }
}
