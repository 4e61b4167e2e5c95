//! RESP2 replies, as Redis writes them on a connection: the one pure function [`parse`] that
//! reads the reply at the start of a buffer, or says it has not arrived whole yet. It never
//! panics and never allocates more than a small multiple of its input, on any input; the fuzz
//! target `resp_reply` holds it to that.
//!
//! Only what the store's own connections ([`super::direct`]) receive: the five RESP2 types,
//! arrays nested at most [`MAX_DEPTH`] deep. Bulk strings are given as ranges of the buffer, so
//! the caller hands them on without a copy.

use std::fmt;
use std::ops::Range;

use super::protocol::ServerError;

/// The deepest nesting of arrays accepted (the store's commands answer none).
pub const MAX_DEPTH: usize = 8;

/// The longest bulk string accepted: Redis's own limit (`proto-max-bulk-len`, 512 MiB).
pub const MAX_BULK: usize = 512 << 20;

/// The longest array accepted.
pub const MAX_ARRAY: usize = 1 << 20;

/// A reply read from a buffer; a bulk string is a range of that buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A nil bulk string or array.
    Nil,
    /// An integer.
    Int(i64),
    /// A simple string (`+OK`).
    Status,
    /// A bulk string: where it is in the buffer.
    Bulk(Range<usize>),
    /// An error reply, by its code.
    Error(ServerError),
    /// An array.
    Array(Vec<Parsed>),
}

/// Bytes that are not a RESP2 reply: the connection they came on is out of step, or not Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadReply {
    /// Where in the buffer.
    pub at: usize,
    /// What was expected there.
    pub what: &'static str,
}

impl fmt::Display for BadReply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "not a RESP2 reply: {} at byte {}", self.what, self.at)
    }
}

impl std::error::Error for BadReply {}

/// The reply at the start of `buf` and its length in bytes, or `None` while it has not arrived
/// whole.
///
/// # Errors
/// Bytes that cannot start a RESP2 reply (see [`BadReply`]).
pub fn parse(buf: &[u8]) -> Result<Option<(Parsed, usize)>, BadReply> {
    let mut at = 0;
    Ok(reply(buf, &mut at, 0)?.map(|parsed| (parsed, at)))
}

/// The reply at `*at`, moving `*at` past it.
fn reply(buf: &[u8], at: &mut usize, depth: usize) -> Result<Option<Parsed>, BadReply> {
    let start = *at;
    let Some(line) = line(buf, start + 1)? else {
        return Ok(None);
    };
    let text = &buf[start + 1..line];
    let next = line + 2;
    let parsed = match buf[start] {
        b'+' => Parsed::Status,
        b'-' => {
            let text = std::str::from_utf8(text).unwrap_or_default();
            Parsed::Error(ServerError::from_code(
                text.split_ascii_whitespace().next().unwrap_or_default(),
            ))
        }
        b':' => Parsed::Int(integer(text).ok_or(BadReply {
            at: start + 1,
            what: "an integer",
        })?),
        b'$' => match length(text, start, MAX_BULK)? {
            None => Parsed::Nil,
            Some(len) => {
                let end = next + len;
                if buf.len() < end + 2 {
                    return Ok(None);
                }
                if &buf[end..end + 2] != b"\r\n" {
                    return Err(BadReply {
                        at: end,
                        what: "CRLF after a bulk string",
                    });
                }
                *at = end + 2;
                return Ok(Some(Parsed::Bulk(next..end)));
            }
        },
        b'*' => {
            if depth == MAX_DEPTH {
                return Err(BadReply {
                    at: start,
                    what: "an array nested at most 8 deep",
                });
            }
            // Elements are kept as they arrive (room for 16 first), so a claimed length costs
            // nothing until its elements are there.
            match length(text, start, MAX_ARRAY)? {
                None => Parsed::Nil,
                Some(len) => {
                    *at = next;
                    let mut items = Vec::with_capacity(len.min(16));
                    for _ in 0..len {
                        match reply(buf, at, depth + 1)? {
                            Some(item) => items.push(item),
                            None => return Ok(None),
                        }
                    }
                    return Ok(Some(Parsed::Array(items)));
                }
            }
        }
        _ => {
            return Err(BadReply {
                at: start,
                what: "a RESP2 type byte (+ - : $ *)",
            });
        }
    };
    *at = next;
    Ok(Some(parsed))
}

/// Where the line starting at `from` ends (its `\r`), or `None` while its CRLF has not arrived.
fn line(buf: &[u8], from: usize) -> Result<Option<usize>, BadReply> {
    let Some(rest) = buf.get(from..) else {
        return Ok(None);
    };
    let Some(cr) = rest.iter().position(|&b| b == b'\r') else {
        return Ok(None);
    };
    match rest.get(cr + 1) {
        None => Ok(None),
        Some(b'\n') => Ok(Some(from + cr)),
        Some(_) => Err(BadReply {
            at: from + cr,
            what: "CRLF at the end of a line",
        }),
    }
}

/// A length: `-1` for nil, else 0 to `max`.
fn length(text: &[u8], at: usize, max: usize) -> Result<Option<usize>, BadReply> {
    if text == b"-1" {
        return Ok(None);
    }
    integer(text)
        .and_then(|n| usize::try_from(n).ok())
        .filter(|&n| n <= max)
        .map(Some)
        .ok_or(BadReply {
            at: at + 1,
            what: "a length",
        })
}

/// A decimal `i64`: an optional `-`, then digits.
fn integer(text: &[u8]) -> Option<i64> {
    let (negative, digits) = match text {
        [b'-', rest @ ..] => (true, rest),
        _ => (false, text),
    };
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    let mut n: i64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(i64::from(d - b'0'))?;
    }
    Some(if negative { -n } else { n })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(buf: &[u8]) -> Parsed {
        let (parsed, len) = parse(buf).unwrap().unwrap();
        assert_eq!(len, buf.len(), "{}", String::from_utf8_lossy(buf));
        // Every shorter prefix is incomplete, never another reply or an error.
        for cut in 0..buf.len() {
            assert_eq!(parse(&buf[..cut]), Ok(None), "{cut}");
        }
        parsed
    }

    #[test]
    fn the_replies_the_store_gets() {
        assert_eq!(whole(b"$-1\r\n"), Parsed::Nil);
        assert_eq!(whole(b"*-1\r\n"), Parsed::Nil);
        assert_eq!(whole(b":2\r\n"), Parsed::Int(2));
        assert_eq!(whole(b":-12\r\n"), Parsed::Int(-12));
        assert_eq!(whole(b"+OK\r\n"), Parsed::Status);
        assert_eq!(whole(b"$5\r\nab\r\nc\r\n"), Parsed::Bulk(4..9));
        assert_eq!(whole(b"$0\r\n\r\n"), Parsed::Bulk(4..4));
        assert_eq!(
            whole(b"*2\r\n:1\r\n$-1\r\n"),
            Parsed::Array(vec![Parsed::Int(1), Parsed::Nil])
        );
        assert_eq!(
            whole(b"-WRONGTYPE Operation against a key {\"d\":1}\r\n"),
            Parsed::Error(ServerError::from_code("WRONGTYPE"))
        );
        // Two replies in a row: the first, and where the second starts.
        let (first, len) = parse(b":1\r\n:2\r\n").unwrap().unwrap();
        assert_eq!((first, len), (Parsed::Int(1), 4));
    }

    #[test]
    fn bad_bytes_are_errors() {
        for bad in [
            &b"?\r\n"[..],
            b":x\r\n",
            b":\r\n",
            b":99999999999999999999\r\n",
            b"$-2\r\n",
            b"$x\r\n",
            b"$3\r\nabcd\r\n",
            b"*-2\r\n",
            b"*1\r\n?\r\n",
            b"_\r\n",
            b"%1\r\n",
        ] {
            assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        assert!(parse(b"*99999999\r\n:1\r\n").is_err());
        assert_eq!(parse(b"*99999\r\n:1\r\n"), Ok(None));
        assert!(parse(b":1\rx").is_err());
        let deep = "*1\r\n".repeat(MAX_DEPTH + 1) + ":1\r\n";
        assert!(parse(deep.as_bytes()).is_err());
        let ok = "*1\r\n".repeat(MAX_DEPTH) + ":1\r\n";
        assert!(parse(ok.as_bytes()).unwrap().is_some());
    }
}
