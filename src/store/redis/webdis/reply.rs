//! Webdis replies, parsed strictly: the one pure function [`parse_reply`] that turns an HTTP
//! status and body into a Redis reply (the family's [`Reply`]) or an error saying what was
//! wrong. It never panics, on any input; the fuzz target `webdis_reply` holds it to that.
//!
//! Webdis answers a command `CMD` with `200 OK` and a JSON object whose only key is `CMD`:
//! `{"GET":"value"}`, `{"GET":null}`, `{"DEL":1}`, `{"SET":[true,"OK"]}` (a status),
//! `{"EVAL":["a",2,null]}` (an array), `{"GET":[false,"ERR ..."]}` (a Redis error). It answers
//! `403 Forbidden` (empty body) for a command its ACL refuses, wrong credentials included,
//! `503 Service Unavailable` when it cannot reach Redis, and `{}` when it cannot encode a reply
//! as JSON (a bulk string that is not UTF-8).

use std::error::Error as StdError;
use std::fmt;

use bytes::Bytes;
use serde_json::Value;

pub use crate::store::redis::protocol::{Reply, ServerError};

/// Why a Webdis reply was refused, with what the caller needs to sort it.
#[derive(Debug)]
#[non_exhaustive]
pub enum ReplyError {
    /// `401` or `403`: wrong or missing credentials, or the ACL forbids the command.
    Forbidden {
        /// The HTTP status.
        status: u16,
        /// The command sent.
        command: String,
    },
    /// A `5xx`: Webdis cannot reach Redis (503), or a proxy in front of it failed.
    ServerError {
        /// The HTTP status.
        status: u16,
        /// The start of the body, for the message.
        snippet: String,
    },
    /// Any other status but `200`.
    UnexpectedStatus {
        /// The HTTP status.
        status: u16,
        /// The start of the body, for the message.
        snippet: String,
    },
    /// A `200` whose body is not JSON (an HTML page from a proxy, a truncated body, ...). The
    /// body is not quoted: a `200` may carry a stored session.
    NotJson {
        /// The body's length in bytes.
        len: usize,
        /// What the JSON parser said.
        cause: serde_json::Error,
    },
    /// JSON, but not `{"<command>": <reply>}` with a reply Webdis can send.
    Shape {
        /// What was wrong.
        detail: String,
    },
    /// `{}`: Webdis could not encode the reply as JSON (a bulk string that is not UTF-8).
    Unencodable,
    /// Redis answered with an error (`[false, "ERR ..."]`), kept by its code only (`ERR`,
    /// `WRONGTYPE`, `NOSCRIPT`, ...): the rest of its message may echo the command's arguments.
    Redis(ServerError),
}

impl ReplyError {
    /// The same error with `secret` replaced by `…` wherever a quoted body holds it (an error
    /// page may echo the request's path, which names the session's key).
    #[must_use]
    pub fn redacted(self, secret: &str) -> ReplyError {
        let redact = |snippet: String| {
            if secret.is_empty() {
                snippet
            } else {
                snippet.replace(secret, "…")
            }
        };
        match self {
            ReplyError::ServerError { status, snippet } => ReplyError::ServerError {
                status,
                snippet: redact(snippet),
            },
            ReplyError::UnexpectedStatus { status, snippet } => ReplyError::UnexpectedStatus {
                status,
                snippet: redact(snippet),
            },
            other => other,
        }
    }
}

impl fmt::Display for ReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplyError::Forbidden { status, command } => write!(
                f,
                "webdis refused {command} with status {status}: wrong or missing credentials \
                 (user:password@ in the URL), or its ACL forbids the command"
            ),
            ReplyError::ServerError { status, snippet } => write!(
                f,
                "webdis answered status {status} (it cannot reach Redis, or a proxy failed): \
                 {snippet:?}"
            ),
            ReplyError::UnexpectedStatus { status, snippet } => {
                write!(f, "webdis answered status {status}: {snippet:?}")
            }
            ReplyError::NotJson { len, .. } => {
                write!(f, "webdis reply of {len} bytes is not JSON")
            }
            ReplyError::Shape { detail } => write!(f, "unexpected webdis reply: {detail}"),
            ReplyError::Unencodable => f.write_str(
                "webdis could not encode the reply as JSON (a stored value that is not UTF-8)",
            ),
            ReplyError::Redis(e) => write!(f, "redis answered {e}"),
        }
    }
}

impl StdError for ReplyError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        match self {
            ReplyError::NotJson { cause, .. } => Some(cause),
            _ => None,
        }
    }
}

/// The start of a body, for messages (at most 100 bytes, lossy UTF-8).
fn snippet(body: &[u8]) -> String {
    const MAX: usize = 100;
    let mut s = String::from_utf8_lossy(&body[..body.len().min(MAX)]).into_owned();
    if body.len() > MAX {
        s.push_str("...");
    }
    s
}

/// Parses Webdis's answer to `command` (the command name as sent in the URL): the HTTP status
/// and the whole body.
///
/// # Errors
/// Every status but 200, and every body that is not `{"<command>": <reply>}`, with the reply in
/// the JSON shapes Webdis produces: see [`ReplyError`].
pub fn parse_reply(status: u16, body: &[u8], command: &str) -> Result<Reply, ReplyError> {
    match status {
        200 => {}
        401 | 403 => {
            return Err(ReplyError::Forbidden {
                status,
                command: command.to_owned(),
            });
        }
        500..=599 => {
            return Err(ReplyError::ServerError {
                status,
                snippet: snippet(body),
            });
        }
        _ => {
            return Err(ReplyError::UnexpectedStatus {
                status,
                snippet: snippet(body),
            });
        }
    }
    let value: Value = serde_json::from_slice(body).map_err(|cause| ReplyError::NotJson {
        len: body.len(),
        cause,
    })?;
    let Value::Object(mut object) = value else {
        return Err(ReplyError::Shape {
            detail: format!("expected a JSON object, got {}", kind(&value)),
        });
    };
    if object.is_empty() {
        return Err(ReplyError::Unencodable);
    }
    if object.len() != 1 {
        return Err(ReplyError::Shape {
            detail: format!(
                "expected only the key {command:?}, got {} keys",
                object.len()
            ),
        });
    }
    let Some(reply) = object.remove(command) else {
        // The other key is not quoted: a `200`'s body may carry a stored session.
        return Err(ReplyError::Shape {
            detail: format!("expected the key {command:?}, got another key"),
        });
    };
    convert(reply)
}

fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// One reply; nesting is bounded by `serde_json`'s recursion limit (128).
fn convert(value: Value) -> Result<Reply, ReplyError> {
    match value {
        Value::Null => Ok(Reply::Nil),
        Value::Number(n) => n.as_i64().map(Reply::Int).ok_or_else(|| ReplyError::Shape {
            detail: format!(
                "a number that is not a 64-bit integer ({} characters)",
                n.to_string().len()
            ),
        }),
        Value::String(s) => Ok(Reply::Bulk(Bytes::from(s))),
        Value::Array(items) => match <[Value; 2]>::try_from(items) {
            Ok([Value::Bool(true), Value::String(_)]) => Ok(Reply::Status),
            Ok([Value::Bool(false), Value::String(message)]) => Err(ReplyError::Redis(
                ServerError::from_code(message.split_ascii_whitespace().next().unwrap_or_default()),
            )),
            Ok(pair) => pair
                .into_iter()
                .map(convert)
                .collect::<Result<_, _>>()
                .map(Reply::Array),
            Err(items) => items
                .into_iter()
                .map(convert)
                .collect::<Result<_, _>>()
                .map(Reply::Array),
        },
        other @ (Value::Bool(_) | Value::Object(_)) => Err(ReplyError::Shape {
            detail: format!("{} where a Redis reply belongs", kind(&other)),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(body: &str, command: &str) -> Reply {
        parse_reply(200, body.as_bytes(), command).unwrap()
    }

    fn err(status: u16, body: &[u8], command: &str) -> ReplyError {
        parse_reply(status, body, command).unwrap_err()
    }

    #[test]
    fn the_shapes_webdis_sends() {
        assert_eq!(
            ok(r#"{"GET":"v/a?l#u%e"}"#, "GET"),
            Reply::Bulk("v/a?l#u%e".into())
        );
        assert_eq!(ok(r#"{"GET":null}"#, "GET"), Reply::Nil);
        assert_eq!(ok(r#"{"DEL":1}"#, "DEL"), Reply::Int(1));
        assert_eq!(ok(r#"{"SET":[true,"OK"]}"#, "SET"), Reply::Status);
        assert_eq!(
            ok(r#"{"EVALSHA":["1:00:{}",1700000000000,7]}"#, "EVALSHA"),
            Reply::Array(vec![
                Reply::Bulk("1:00:{}".into()),
                Reply::Int(1_700_000_000_000),
                Reply::Int(7)
            ])
        );
        assert_eq!(
            ok(r#"{"X":[[1,"a"],[],null]}"#, "X"),
            Reply::Array(vec![
                Reply::Array(vec![Reply::Int(1), Reply::Bulk("a".into())]),
                Reply::Array(vec![]),
                Reply::Nil
            ])
        );
        assert_eq!(
            ok("{\"GET\":\"z\\u00fcrich \u{1f980} \\n\"}", "GET"),
            Reply::Bulk("zürich 🦀 \n".into())
        );
    }

    fn code(e: &ReplyError) -> Option<&str> {
        match e {
            ReplyError::Redis(e) => Some(e.code()),
            _ => None,
        }
    }

    #[test]
    fn redis_errors_keep_their_code_only() {
        let e = err(
            200,
            br#"{"EVALSHA":[false,"NOSCRIPT No matching script."]}"#,
            "EVALSHA",
        );
        assert_eq!(code(&e), Some("NOSCRIPT"));
        assert_eq!(e.to_string(), "redis answered an error reply NOSCRIPT");
        let e = err(200, br#"{"GET":[false,"LOADING Redis is loading"]}"#, "GET");
        assert_eq!(code(&e), Some("LOADING"));
        let e = err(
            200,
            br#"{"EVALSHA":[false,"ERR user_script:1: {\"d\":{\"secret\":1}}"]}"#,
            "EVALSHA",
        );
        assert_eq!(code(&e), Some("ERR"));
        assert!(!format!("{e} {e:?}").contains("secret"), "{e:?}");
        // An error nested in an array is an error all the same.
        let e = err(200, br#"{"X":[1,[false,"ERR inner"]]}"#, "X");
        assert_eq!(code(&e), Some("ERR"));
    }

    #[test]
    fn statuses() {
        for status in [401, 403] {
            let e = err(status, b"", "EVALSHA");
            assert!(matches!(e, ReplyError::Forbidden { .. }), "{e:?}");
            assert!(e.to_string().contains("EVALSHA"), "{e}");
        }
        for status in [500, 502, 503, 504] {
            let e = err(status, b"<html>Bad Gateway</html>", "GET");
            assert!(matches!(e, ReplyError::ServerError { .. }), "{e:?}");
            assert!(e.to_string().contains(&status.to_string()), "{e}");
        }
        for status in [0, 100, 204, 301, 404, 405, 413, 999, u16::MAX] {
            let e = err(status, br#"{"GET":"v"}"#, "GET");
            assert!(matches!(e, ReplyError::UnexpectedStatus { .. }), "{e:?}");
        }
    }

    #[test]
    fn malformed_bodies() {
        let html = b"<!DOCTYPE html><html><body><h1>It works!</h1></body></html>";
        let e = err(200, html, "GET");
        assert!(matches!(e, ReplyError::NotJson { .. }), "{e:?}");
        // A 200's body may be a stored session: its length is told, never its bytes.
        assert!(!e.to_string().contains("DOCTYPE"), "{e}");
        assert!(e.to_string().contains("59 bytes"), "{e}");
        assert!(e.source().is_some());
        for body in [
            &b""[..],
            b"{",
            br#"{"GET":"v""#,
            br#"{"GET":"v"} trailing"#,
            b"\xff\xfe",
        ] {
            let e = err(200, body, "GET");
            assert!(matches!(e, ReplyError::NotJson { .. }), "{body:?}: {e:?}");
        }
        assert!(matches!(err(200, b"{}", "GET"), ReplyError::Unencodable));
        for body in [
            &br#""GET""#[..],
            b"null",
            b"[1]",
            b"42",
            br#"{"SET":"v"}"#,
            br#"{"get":"v"}"#,
            br#"{"GET":"v","DEL":1}"#,
            br#"{"GET":true}"#,
            br#"{"GET":{"a":1}}"#,
            br#"{"GET":1.5}"#,
            br#"{"GET":18446744073709551615}"#,
            br#"{"GET":[true,1]}"#,
            br#"{"GET":[false]}"#,
            br#"{"GET":[1,true]}"#,
        ] {
            let e = err(200, body, "GET");
            assert!(
                matches!(e, ReplyError::Shape { .. }),
                "{}: {e:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let deep = format!("{{\"X\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(matches!(
            err(200, deep.as_bytes(), "X"),
            ReplyError::NotJson { .. }
        ));
    }

    #[test]
    fn quoted_bodies_never_name_the_key() {
        let key = "3f2a9c0e1b7d4e58a1b2c3d4e5f60718";
        for status in [404, 502] {
            let body = format!("<h1>Cannot GET /GET/session:{key}</h1>");
            let e = err(status, body.as_bytes(), "GET").redacted(key);
            let shown = format!("{e} {e:?}");
            assert!(
                !shown.contains(key) && shown.contains("session:…"),
                "{shown}"
            );
        }
        let e = err(200, br#"{"session:secret":"v"}"#, "GET");
        assert!(!e.to_string().contains("secret"), "{e}");
        let e = err(200, br#"{"GET":12345678901234567890123}"#, "GET");
        assert!(!e.to_string().contains("1234"), "{e}");
    }

    #[test]
    fn long_bodies_are_cut_in_messages() {
        let body = vec![b'<'; 1 << 20];
        let e = err(502, &body, "GET");
        assert!(e.to_string().len() < 300, "{e}");
    }
}
