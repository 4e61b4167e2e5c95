//! Webdis URLs: the base URL a store is opened with (scheme, host, path prefix, credentials),
//! and the request for one command, every argument a percent-encoded path segment but the
//! stored value or script, which goes in the body.

use bytes::Bytes;
use http::header::HeaderValue;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, percent_encode};

use super::WebdisError;
use crate::store::redis::protocol::{Arg, Command, Head};

/// Every byte but ASCII letters, digits, `-` and `_` is percent-encoded in a path segment:
/// `/` would split arguments, `.` would select Webdis's output format, `+` would become a space.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_');

/// A parsed base URL: the part requests start with, and the credentials.
#[derive(Debug)]
pub(super) struct Target {
    /// `scheme://host:port[/path]`, without credentials or a trailing `/`.
    pub(super) base: String,
    pub(super) auth: Option<HeaderValue>,
}

impl Target {
    /// `http://` or `https://`, the host and port, optionally `user:password@` (percent-encoded;
    /// sent as HTTP Basic auth) and a path prefix. No query, no fragment.
    pub(super) fn parse(url: &str) -> Result<Target, WebdisError> {
        let bad =
            |why: &str| WebdisError::msg(format!("invalid webdis URL {:?}: {why}", redact(url)));
        let uri: http::Uri = url.parse().map_err(|_| bad("not a URL"))?;
        let Some(scheme @ ("http" | "https")) = uri.scheme_str() else {
            return Err(bad("the scheme must be http or https"));
        };
        if uri.query().is_some() || url.contains('#') {
            return Err(bad("no query or fragment allowed"));
        }
        let authority = uri.authority().ok_or_else(|| bad("no host"))?.as_str();
        let (userinfo, host) = match authority.rsplit_once('@') {
            Some((userinfo, host)) => (Some(userinfo), host),
            None => (None, authority),
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let auth = match userinfo {
            None => None,
            Some(userinfo) => {
                let decoded: Vec<u8> = userinfo
                    .split(':')
                    .map(|part| percent_decode_str(part).collect::<Vec<u8>>())
                    .collect::<Vec<_>>()
                    .join(&b':');
                let mut value = HeaderValue::try_from(format!("Basic {}", base64(&decoded)))
                    .map_err(|_| bad("credentials cannot be sent"))?;
                value.set_sensitive(true);
                Some(value)
            }
        };
        let path = uri.path().trim_end_matches('/');
        Ok(Target {
            base: format!("{scheme}://{host}{path}"),
            auth,
        })
    }
}

/// A URL with its password replaced by `***`, for messages.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}{}", &rest[authority_end..])
        }
        None => url.to_owned(),
    }
}

/// Standard base64 with padding (RFC 4648), for the Basic auth header.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> shift) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The request for `cmd`: `base/NAME/arg/...` (a script's SHA1 or source, the key count and
/// the key first), every argument a percent-encoded segment, but a stored value or a script's
/// source, which goes in the body (Webdis appends a `PUT`'s body as the last argument, byte for
/// byte, so session data never travels in the URL).
///
/// # Errors
/// A command with a value or source before its last argument (the protocol never builds one).
pub(super) fn request(
    base: &str,
    cmd: &Command<'_>,
) -> Result<(String, Option<Bytes>), WebdisError> {
    let mut url = String::with_capacity(base.len() + 160);
    url.push_str(base);
    let mut segment = |bytes: &[u8]| {
        url.push('/');
        url.extend(percent_encode(bytes, SEGMENT));
    };
    segment(cmd.head.name().as_bytes());
    match cmd.head {
        Head::Name(_) => {}
        Head::EvalSha(script) => {
            segment(script.sha.as_bytes());
            segment(b"1");
        }
        Head::Eval(script) => {
            segment(script.source.as_bytes());
            segment(b"1");
        }
    }
    if let Some(key) = cmd.key {
        let mut name = Vec::with_capacity(key.len());
        key.write(&mut name);
        segment(&name);
    }
    let mut body = None;
    for (i, arg) in cmd.args.iter().enumerate() {
        let last = i + 1 == cmd.args.len();
        match *arg {
            Arg::Word(word) => segment(word.as_bytes()),
            Arg::Int(n) => segment(itoa::Buffer::new().format(n).as_bytes()),
            Arg::Key(key) => segment(key.to_hex().as_bytes()),
            Arg::Name(name) => {
                let mut bytes = Vec::with_capacity(name.len());
                name.write(&mut bytes);
                segment(&bytes);
            }
            Arg::Value(header, data) if last => {
                let mut value = Vec::with_capacity(header.as_bytes().len() + data.len());
                value.extend_from_slice(header.as_bytes());
                value.extend_from_slice(data);
                body = Some(Bytes::from(value));
            }
            Arg::Source(source) if last => body = Some(Bytes::from_static(source.as_bytes())),
            Arg::Value(..) | Arg::Source(_) => {
                return Err(WebdisError::msg(format!(
                    "a {} with a value before its last argument cannot be sent through webdis",
                    cmd.head.name()
                )));
            }
        }
    }
    Ok((url, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::Key;
    use crate::store::redis::protocol::KeyName;
    use crate::store::redis::value::Header;

    #[test]
    fn base64_matches_rfc_4648() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
            ("app:s3cret", "YXBwOnMzY3JldA=="),
        ] {
            assert_eq!(base64(input.as_bytes()), want, "{input}");
        }
    }

    #[test]
    fn base_urls() {
        let t = Target::parse("http://127.0.0.1:7379").unwrap();
        assert_eq!(t.base, "http://127.0.0.1:7379");
        assert!(t.auth.is_none());
        let t = Target::parse("https://app:p%40ss%3Aw@webdis.example:443/proxy/").unwrap();
        assert_eq!(t.base, "https://webdis.example:443/proxy");
        assert_eq!(
            t.auth.unwrap().to_str().unwrap(),
            format!("Basic {}", base64(b"app:p@ss:w"))
        );
        for bad in [
            "redis://127.0.0.1:6379",
            "127.0.0.1:7379",
            "http://127.0.0.1:7379/?db=1",
            "http://127.0.0.1:7379/#x",
            "",
            "http://",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad} parsed");
        }
        let e = Target::parse("ftp://app:secret@host/").unwrap_err();
        let shown = format!("{e:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("app:***@host"), "{shown}");
    }

    #[test]
    fn segments_cannot_split_or_select_a_format() {
        let encoded: String =
            percent_encode("a/b.json+c d%2F?#\"'\n:é".as_bytes(), SEGMENT).to_string();
        assert_eq!(encoded, "a%2Fb%2Ejson%2Bc%20d%252F%3F%23%22%27%0A%3A%C3%A9");
        assert!(
            encoded
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"%-_".contains(&b))
        );
    }

    #[test]
    fn requests_keep_values_out_of_the_url() {
        let key = Key::random();
        let key_name = KeyName {
            prefix: "a/b.",
            key,
        };
        let header = Header::new(2, 5, 1, 7, None);
        let args = [Arg::Int(1), Arg::Int(5), Arg::Value(&header, b"{\"/\":1}")];
        let cmd = Command {
            head: Head::Name("SET"),
            key: Some(key_name),
            args: &args,
        };
        let (url, body) = request("http://h:1/p", &cmd).unwrap();
        assert_eq!(
            url,
            format!("http://h:1/p/SET/a%2Fb%2E{}/1/5", key.to_hex())
        );
        let body = body.unwrap();
        assert!(body.starts_with(header.as_bytes()) && body.ends_with(b"{\"/\":1}"));
        let misplaced = [Arg::Value(&header, b"{}"), Arg::Word("NX")];
        let cmd = Command {
            args: &misplaced,
            ..cmd
        };
        assert!(request("http://h:1", &cmd).is_err());
    }
}
