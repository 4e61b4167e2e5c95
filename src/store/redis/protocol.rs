//! The Redis family's one protocol: the commands and scripts each store operation sends, the
//! replies they expect, how failures are sorted, and the lost-reply rules. A [`Transport`]
//! carries a command to Redis and brings its reply back: the `redis` crate's connections
//! ([`RedisStore`](crate::RedisStore)) or Webdis's HTTP interface
//! ([`WebdisStore`](crate::WebdisStore)). Both stores run this protocol on the same keys and
//! [values](super::value), so one Redis serves the same sessions to both.
//!
//! | operation | command |
//! |---|---|
//! | load | `GET key` |
//! | create | `SET key value NX PXAT ms GET` (Webdis: the [create script](CREATE_LUA), which sends the same) |
//! | save | the [save script](SAVE_LUA) (compare-and-set on the version) |
//! | touch | the [touch script](TOUCH_LUA) |
//! | remove | the [remove script](REMOVE_LUA) |
//! | delete | `DEL key` |
//! | owned | the [list script](LIST_LUA) on the owner's index, an `MGET` per 256 listed sessions (a cluster: a `GET` each, sent together), and the [drop script](DROP_LUA) for stale entries, if any |
//!
//! # Owners
//! A record's [owner](Record::owner) is kept in its value (see [`value`](super::value)), so a
//! load returns it with the same `GET`. Each owner has an index: a sorted set at
//! `<prefix>owner:<digest>` (the digest: the first 128 bits of the BLAKE3 hash of the owner, in
//! hex, so that no owner appears in a key, and no owner's braces make a hash tag), whose members
//! are the owner's session keys (their 32 hex digits) and whose scores are the expiry (Unix ms)
//! of the write that added each. The index and the sessions live in different cluster slots,
//! so no command spans both: the index entry is written **before** the record, never after.
//!
//! - A `create` of an owned record first runs the [add script](ADD_LUA) on the index (`ZADD
//!   GT`), then creates the record: a login is one round trip more.
//! - A `save` of an owned record asks the [save script](SAVE_LUA) to check that the stored owner
//!   is the record's; if it is not (the owner changes), the script writes nothing and answers 3,
//!   the store adds the index entry and runs the script again, told not to check: an owner
//!   change costs two round trips more, a save that keeps the owner none.
//! - `touch`, `remove`, `delete` and a save without an owner never touch an index: the entries
//!   they leave behind (for a record gone, or no longer the owner's) are stale.
//! - Listing reads the whole index, loads every listed session, and answers those that are live
//!   and the owner's. A stale entry is dropped, by the [drop script](DROP_LUA), only when its
//!   score is not after the instant the listing started: an entry whose score is later may
//!   belong to a write still under way (its entry written, its record not yet), and is kept
//!   until its score passes. The drop script checks the score again, atomically with the drop,
//!   so an entry added again meanwhile (its score then the new write's expiry, later) stays.
//! - The add script also answers the index's entries whose score has passed (at most
//!   [`SWEEP_LIMIT`]); the store loads them after its write and drops the stale ones, as a listing
//!   does. So an owner's index holds their live sessions, the entries whose score has not passed
//!   yet, and at most the entries that turned stale since the owner's last login or listing.
//!
//! Why no live owned record is ever without its entry. Every write that gives a record an owner
//! (a create, or a save whose script found another owner) runs after the add script, which
//! leaves the entry's score at least that write's expiry (`GT`: the score never falls while the
//! entry lives). A listing or sweep that starts at `T` drops an entry only if the record, loaded
//! after `T`, was missing or not the owner's, and only if the entry's score is still at most
//! `T` when the drop script runs (checked and dropped in one atomic step). Take a write that
//! gives the record the owner after that load: if its add ran after `T`, the score it set is
//! its expiry, later than `T`, and the drop leaves the entry (or, if the add came after the
//! drop, the entry is back before the write); if its add ran before `T`, the write's expiry is
//! at most the score, so at most `T`: the record it writes is expired already. A lost reply
//! changes nothing: the add is idempotent and retried before the write, and a write is never
//! sent before its add was acknowledged (by the replicas too, with `min_replicas_ack`). This
//! holds within the clock skew between application servers (scores, expiries and `T` are
//! their clocks' instants).
//!
//! Scripts go by `EVALSHA`; a server that lacks one (after a restart or `SCRIPT FLUSH`, or a
//! cluster node that never saw it) answers `NOSCRIPT`, and the command goes again once as
//! `EVAL` with the source, which also caches it there.

use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;

use super::value::{self, Header, clamp_expiry, lua_header_pattern};
use crate::error::StoreError;
use crate::key::{KEY_HEX_LEN, Key};
use crate::store::record::{Record, unix_ms};
use crate::store::{CreateOutcome, SaveOutcome};

/// The stored owner of a value (`s`, or its first bytes) in Lua: nil for a value without one.
macro_rules! lua_owner_of {
    () => {
        r"local function owner(s)
  local n, i = string.match(s, '^%d+:%d+:%x+:%d+/(%d+):()')
  if n == nil then return nil end
  return string.sub(s, i, i + tonumber(n) - 1)
end
"
    };
}

/// Compare-and-set on the version in the stored value's header.
///
/// `KEYS[1]` the key; `ARGV[1]` the expected version; `ARGV[2]` the new value's expiry (Unix
/// ms); `ARGV[3]` `0` to check that the stored owner is the new value's, `1` not to (the new
/// value has no owner, or its owner's index entry is written); `ARGV[4]` the new value (last,
/// so that Webdis can send it as the request body). Answers 0 (missing), 1 (conflict), 2
/// (saved) or 3 (the expected version, but another owner, and `ARGV[3]` is `0`: nothing
/// written, the owner's index entry is to be written first). A stored value that already
/// carries the new value's version *and write token* is this very write, applied by an earlier
/// attempt whose reply was lost: it answers 2 again instead of a false conflict. (If another writer saved on
/// top of it since, the retry answers 1, which [`settle`] turns into an unknown outcome.)
///
/// Checking the owner, it reads the value's first 512 bytes instead of 64 (the longest header
/// with an owner fits: see the unit test), in the same one `GETRANGE`.
pub(crate) const SAVE_LUA: &str = concat!(
    r"local h = redis.call('GETRANGE', KEYS[1], 0, ARGV[3] == '0' and 511 or 63)
if h == '' then return 0 end
local v = string.match(h, '^(%d+):')
if v == ARGV[1] then
  if ARGV[3] == '0' then
",
    lua_owner_of!(),
    r"    if owner(h) ~= owner(ARGV[4]) then return 3 end
  end
  redis.call('SET', KEYS[1], ARGV[4], 'PXAT', ARGV[2])
  return 2
end
local p = '",
    lua_header_pattern!(),
    r"'
local sv, t = string.match(h, p)
local nv, nt = string.match(ARGV[4], p)
if sv ~= nil and sv == nv and t == nt then return 2 end
return 1
"
);

/// The start of the touch and remove scripts: answers 0 when the key is missing, 1 when its
/// value's version is not `ARGV[1]` (or the value is not in the layout); what follows runs
/// only on the expected version, with the version's digits in `v`.
macro_rules! if_version {
    () => {
        concat!(
            r"local h = redis.call('GETRANGE', KEYS[1], 0, 63)
if h == '' then return 0 end
local v = string.match(h, '",
            lua_header_pattern!(),
            r"')
if v ~= ARGV[1] then return 1 end
"
        )
    };
}

/// Moves a record's expiry if its version is the expected one: the expiry in the value
/// (rewritten in place, 15 digits) and the key's TTL, in one atomic step; the version, token
/// and payload stay.
///
/// `KEYS[1]` the key; `ARGV[1]` the expected version; `ARGV[2]` the new expiry (Unix ms,
/// [clamped](clamp_expiry), so at most 15 digits). Answers 0 (missing), 1 (conflict) or 2
/// (moved). Applied twice (a retry after a lost reply), it answers 2 again: the version is
/// unchanged by the first.
pub(crate) const TOUCH_LUA: &str = concat!(
    if_version!(),
    r"redis.call('SETRANGE', KEYS[1], #v + 1, string.rep('0', 15 - #ARGV[2]) .. ARGV[2])
redis.call('PEXPIREAT', KEYS[1], ARGV[2])
return 2
"
);

/// Deletes a record if its version is the expected one.
///
/// `KEYS[1]` the key; `ARGV[1]` the expected version. Answers 0 (missing), 1 (conflict) or 2
/// (deleted). Applied twice (a retry after a lost reply), the second answers 0: a retried
/// remove that does not answer 2 has an unknown outcome (see [`settle`]).
pub(crate) const REMOVE_LUA: &str =
    concat!(if_version!(), "redis.call('DEL', KEYS[1])\nreturn 2\n");

/// Adds a session to its owner's index (`ZADD GT`: a score only ever rises while the entry
/// lives) and answers the index's entries whose score has passed, for a sweep.
///
/// `KEYS[1]` the owner's index; `ARGV[1]` the score (the write's expiry, Unix ms); `ARGV[2]`
/// the session key's hex; `ARGV[3]` now (Unix ms); `ARGV[4]` at most this many entries answered.
pub(crate) const ADD_LUA: &str = r"redis.call('ZADD', KEYS[1], 'GT', ARGV[1], ARGV[2])
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[3], 'LIMIT', 0, ARGV[4])
";

/// An owner's whole index, members and scores (a script: its scores come back as strings on
/// every protocol version and transport).
///
/// `KEYS[1]` the owner's index. Answers `member, score, member, score, ...`.
pub(crate) const LIST_LUA: &str = "return redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')\n";

/// Drops stale entries from an owner's index: each whose score is, now still, at most the
/// instant given (an entry added again since the sweep started has a later score, and stays).
///
/// `KEYS[1]` the owner's index; `ARGV[1]` the instant the sweep started (Unix ms); `ARGV[2..]`
/// the session keys' hex. Answers how many were dropped.
pub(crate) const DROP_LUA: &str = r"local n = 0
for i = 2, #ARGV do
  local s = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if s and tonumber(s) <= tonumber(ARGV[1]) then
    n = n + redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return n
";

/// The most entries of an index the add script hands to a sweep.
pub(crate) const SWEEP_LIMIT: u64 = 32;

/// The most stale entries one drop script call takes.
const DROP_BATCH: usize = 64;

/// The most keys one `MGET` of an owner listing asks for.
const MGET_KEYS: usize = 256;

/// The most `MGET`s of one owner listing under way at a time: a listing of up to 1,024
/// sessions in one round trip, at most that many values in flight.
const MGETS_UNDER_WAY: usize = 4;

/// `SET key value NX PXAT ms GET` with the value last, for a transport that sends the value as
/// the last argument (Webdis, as the request body): `KEYS[1]` the key; `ARGV[1]` the expiry
/// (Unix ms); `ARGV[2]` the value. Answers what `SET` answers (the old value, or nil), so that
/// one rule ([`create_outcome`]) reads both transports' replies.
pub(crate) const CREATE_LUA: &str =
    "return redis.call('SET', KEYS[1], ARGV[2], 'NX', 'PXAT', ARGV[1], 'GET')\n";

/// A script, by its source and by the SHA1 `EVALSHA` names it by.
#[derive(Debug)]
pub(crate) struct Script {
    pub(crate) source: &'static str,
    pub(crate) sha: String,
}

impl Script {
    fn new(source: &'static str) -> Script {
        Script {
            source,
            sha: sha1_smol::Sha1::from(source).digest().to_string(),
        }
    }
}

/// The scripts, their SHA1s computed once per store.
#[derive(Debug)]
struct Scripts {
    save: Script,
    touch: Script,
    remove: Script,
    create: Script,
    add: Script,
    list: Script,
    drop: Script,
}

/// A reply from Redis, in the shapes the family's commands get (and a few they never should).
/// Error replies are not replies here: a transport answers them as errors.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Reply {
    /// A nil bulk string or nil array.
    Nil,
    /// An integer.
    Int(i64),
    /// A bulk string.
    Bulk(Bytes),
    /// A status reply (`OK`).
    Status,
    /// An array of replies.
    Array(Vec<Reply>),
}

impl Reply {
    /// The reply's kind, for messages: never its contents (a reply may hold session data).
    fn kind(&self) -> String {
        match self {
            Reply::Nil => "nil".to_owned(),
            Reply::Int(_) => "an integer".to_owned(),
            Reply::Bulk(b) => format!("a bulk string of {} bytes", b.len()),
            Reply::Status => "a status".to_owned(),
            Reply::Array(a) => format!("an array of {}", a.len()),
        }
    }
}

/// An error reply from Redis, kept by its code word only (`WRONGTYPE`, `NOSCRIPT`, ...): the
/// free text after it may echo a command's arguments (Lua errors do).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    code: String,
}

impl ServerError {
    /// The error reply with this code.
    pub fn from_code(code: &str) -> ServerError {
        // A code is one short word of capitals; anything else is not quoted.
        let word =
            (1..=32).contains(&code.len()) && code.bytes().all(|b| b.is_ascii_alphanumeric());
        let code = if word { code } else { "(unnamed)" };
        ServerError {
            code: code.to_owned(),
        }
    }

    /// The error code.
    pub fn code(&self) -> &str {
        &self.code
    }

    /// A server that is loading, busy, read-only, out of memory, without a master or without
    /// enough replicas: down for now, not broken.
    fn is_unavailable(&self) -> bool {
        matches!(
            self.code(),
            "LOADING"
                | "BUSY"
                | "TRYAGAIN"
                | "CLUSTERDOWN"
                | "MASTERDOWN"
                | "READONLY"
                | "OOM"
                | "NOREPLICAS"
                | "MISCONF"
        )
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "an error reply {}", self.code)
    }
}

impl std::error::Error for ServerError {}

type Cause = Box<dyn std::error::Error + Send + Sync>;

/// Why a transport brought no reply back.
#[derive(Debug)]
pub(crate) enum SendError {
    /// The connection broke after the command may have been sent: sent once more, after which
    /// a write's outcome may be unknown.
    Broken(Cause),
    /// The command was never sent (the connection was refused): sent once more, as a first
    /// attempt.
    NotSent(Cause),
    /// Redis answered with an error reply.
    Server(ServerError),
    /// The answer shows a key this store cannot have written: one of another type
    /// (`WRONGTYPE`), or a value the transport cannot carry (Webdis: not UTF-8).
    Corrupt(Cause),
    /// The transport finds Redis down or out of reach (a timeout, a Webdis `503`, no master).
    Unavailable(Cause),
    /// The deadline passed before the reply came (from a transport that
    /// [keeps the deadline](Transport::keeps_deadline) itself).
    #[cfg_attr(
        not(feature = "redis"),
        expect(
            dead_code,
            reason = "only the Redis store's own connection keeps its deadline"
        )
    )]
    TimedOut,
    /// Anything else.
    Other(Cause),
}

impl From<ServerError> for SendError {
    fn from(e: ServerError) -> SendError {
        if e.code() == "WRONGTYPE" {
            SendError::Corrupt(Box::new(e))
        } else {
            SendError::Server(e)
        }
    }
}

/// What a transport brought back.
#[derive(Debug)]
pub(crate) struct Sent {
    pub(crate) reply: Reply,
    /// The reply to the command sent after it in the same round trip, if any.
    pub(crate) then: Option<Reply>,
}

/// Carries one command to Redis and its reply back.
pub(crate) trait Transport: Send + Sync + 'static {
    /// What messages call this way to Redis: `redis`, `webdis`.
    const NAME: &'static str;
    /// Whether a stored value must be a command's last argument (Webdis sends it as the request
    /// body).
    const VALUE_LAST: bool;
    /// Whether a stored value may hold any bytes (Webdis's JSON replies carry UTF-8 text
    /// without NUL bytes only).
    const BINARY_SAFE: bool;
    /// How many loads an owner listing keeps under way at once.
    const CONCURRENT_LOADS: usize;

    /// Sends `cmd` once, and `then` after it in the same round trip, on the same connection (a
    /// `WAIT`, which needs the connection that made the write; asked for only by a store
    /// configured to wait for replicas). An error reply to `then` is no error: its reply is
    /// then `None`.
    fn send(
        &self,
        cmd: &Command<'_>,
        then: Option<&Command<'_>>,
        deadline: Instant,
    ) -> impl std::future::Future<Output = Result<Sent, SendError>> + Send;

    /// Whether every key is on the one server this transport talks to, so that a command may
    /// name several (`MGET`): not on a cluster.
    fn one_node(&self) -> bool {
        false
    }

    /// Whether `send` itself fails with [`SendError::TimedOut`] once its deadline passes; for
    /// a transport that does not, the protocol races each operation against a timer of its own.
    fn keeps_deadline(&self) -> bool {
        false
    }
}

/// A command as the protocol builds it; the transport writes it on its wire.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Command<'a> {
    pub(crate) head: Head<'a>,
    /// The session's key (after the script's key count, for a script).
    pub(crate) key: Option<KeyName<'a>>,
    /// The arguments after the key; a [`Arg::Value`] or [`Arg::Source`] comes last.
    pub(crate) args: &'a [Arg<'a>],
}

/// What a command starts with.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Head<'a> {
    /// A command by name (`GET`, `SET`, `DEL`, `SCRIPT`).
    Name(&'static str),
    /// `EVALSHA sha 1`: a script by its SHA1, with one key.
    EvalSha(&'a Script),
    /// `EVAL source 1`: a script by its source, with one key.
    Eval(&'a Script),
}

impl Head<'_> {
    /// The command's name.
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Head::Name(name) => name,
            Head::EvalSha(_) => "EVALSHA",
            Head::Eval(_) => "EVAL",
        }
    }
}

/// A session's key in Redis: the prefix, then the key's 32 hex digits.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeyName<'a> {
    pub(crate) prefix: &'a str,
    pub(crate) key: Key,
}

impl KeyName<'_> {
    /// The key name's bytes, written into `out` (no allocation).
    pub(crate) fn write(&self, out: &mut impl std::io::Write) {
        let mut hex = [0; KEY_HEX_LEN];
        self.key.encode(&mut hex);
        // Writes into a buffer cannot fail.
        let _ = out.write_all(self.prefix.as_bytes());
        let _ = out.write_all(&hex);
    }

    /// The key name's length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.prefix.len() + KEY_HEX_LEN
    }
}

/// One argument of a command.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Arg<'a> {
    /// A word (`NX`, `PXAT`, `LOAD`).
    Word(&'static str),
    /// A number, in decimal.
    Int(u64),
    /// A stored value: its header, then the payload.
    Value(&'a Header, &'a [u8]),
    /// A script's source (`SCRIPT LOAD`).
    Source(&'static str),
    /// A session's key in hex, without the prefix (a member of an owner's index).
    Key(Key),
    /// A session's whole key name (`MGET`'s keys after the first).
    Name(KeyName<'a>),
}

/// The replicas a write must reach (`WAIT`) before it counts as stored.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Acks {
    pub(crate) replicas: u64,
    pub(crate) timeout: Duration,
}

/// The family's operations over one transport, and what they share: the key prefix, the
/// timeout, the scripts, the write tokens, the replicas a write must reach.
pub(crate) struct Protocol<T> {
    pub(crate) transport: T,
    pub(crate) prefix: String,
    pub(crate) timeout: Duration,
    pub(crate) acks: Option<Acks>,
    scripts: Scripts,
    /// The start of an owner index's key: the prefix, then `owner:`.
    owner_prefix: String,
    /// Write tokens: a random start, then one more per write.
    tokens: AtomicU64,
}

/// Entries of an owner's index whose score had passed when the add script ran, for a sweep.
#[derive(Debug, Default)]
struct Due {
    /// When the add script ran (Unix ms): the entries scored at most this are due.
    since: u64,
    keys: Vec<Key>,
}

/// The session key an index member names, if it is one (32 lowercase hex digits).
fn member_key(member: &Reply) -> Option<Key> {
    let Reply::Bulk(hex) = member else {
        return None;
    };
    let hex: &[u8; KEY_HEX_LEN] = hex.as_ref().try_into().ok()?;
    let mut bytes = [0; 16];
    for (byte, pair) in bytes.iter_mut().zip(hex.chunks_exact(2)) {
        let digit = |d: u8| match d {
            b'0'..=b'9' => Some(d - b'0'),
            b'a'..=b'f' => Some(d - b'a' + 10),
            _ => None,
        };
        *byte = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(Key::from_bytes(bytes))
}

/// A reply, whether it answered a second attempt (the first may have been applied: see
/// [`settle`]), and the replicas `WAIT` counted.
struct Answer {
    reply: Reply,
    retried: bool,
    acked: Option<i64>,
}

/// An operation and its session, for messages.
#[derive(Debug, Clone, Copy)]
struct Op {
    name: &'static str,
    /// The session's key, named in messages by its fingerprint (made only for a message).
    session: Option<Key>,
}

impl Op {
    fn on(name: &'static str, key: &Key) -> Op {
        Op {
            name,
            session: Some(*key),
        }
    }
}

impl<T: Transport> Protocol<T> {
    /// The protocol over `transport`, with keys under `prefix`, each operation bounded by
    /// `timeout`, and each write acknowledged once `min_replicas_ack.0` replicas have it (waiting
    /// at most `min_replicas_ack.1`; 0 replicas, or `None`, wait for none).
    pub(crate) fn new(
        transport: T,
        prefix: String,
        timeout: Duration,
        min_replicas_ack: Option<(usize, Duration)>,
    ) -> Protocol<T> {
        let acks =
            min_replicas_ack
                .filter(|&(replicas, _)| replicas > 0)
                .map(|(replicas, timeout)| Acks {
                    replicas: u64::try_from(replicas).unwrap_or(u64::MAX),
                    timeout: timeout.max(Duration::from_millis(1)),
                });
        Protocol {
            transport,
            timeout,
            acks,
            scripts: Scripts {
                save: Script::new(SAVE_LUA),
                touch: Script::new(TOUCH_LUA),
                remove: Script::new(REMOVE_LUA),
                create: Script::new(CREATE_LUA),
                add: Script::new(ADD_LUA),
                list: Script::new(LIST_LUA),
                drop: Script::new(DROP_LUA),
            },
            owner_prefix: format!("{prefix}owner:"),
            prefix,
            tokens: AtomicU64::new(uuid::Uuid::new_v4().as_u64_pair().0),
        }
    }

    /// The Redis key of a session, as text.
    pub(crate) fn key_string(&self, key: &Key) -> String {
        key.prefixed(&self.prefix)
    }

    fn key_name(&self, key: &Key) -> KeyName<'_> {
        KeyName {
            prefix: &self.prefix,
            key: *key,
        }
    }

    /// The key of `owner`'s index: `<prefix>owner:` and a digest of the owner, never the owner.
    fn index_name(&self, owner: &str) -> KeyName<'_> {
        let digest = blake3::hash(owner.as_bytes());
        let mut bytes = [0; 16];
        bytes.copy_from_slice(&digest.as_bytes()[..16]);
        KeyName {
            prefix: &self.owner_prefix,
            key: Key::from_bytes(bytes),
        }
    }

    /// Loads the scripts this transport uses into the server's cache (`SCRIPT LOAD`), which
    /// also checks that Redis answers; each must come back under the SHA1 computed here.
    pub(crate) async fn load_scripts(&self) -> Result<(), StoreError> {
        let op = Op {
            name: "SCRIPT LOAD",
            session: None,
        };
        let s = &self.scripts;
        let create = T::VALUE_LAST.then_some(&s.create);
        let all = [&s.save, &s.touch, &s.remove, &s.add, &s.list, &s.drop];
        for script in all.into_iter().chain(create) {
            let args = [Arg::Word("LOAD"), Arg::Source(script.source)];
            let cmd = Command {
                head: Head::Name("SCRIPT"),
                key: None,
                args: &args,
            };
            match self.run(op, &cmd, false).await?.reply {
                Reply::Bulk(sha) if sha == script.sha.as_bytes() => {}
                other => return Err(Self::unexpected(op, &other)),
            }
        }
        Ok(())
    }

    pub(crate) async fn load(&self, key: &Key) -> Result<Option<Record>, StoreError> {
        let Some(stored) = self.fetch(Op::on("load", key), key).await? else {
            return Ok(None);
        };
        Ok(Some(Self::record(key, stored)))
    }

    fn record(key: &Key, stored: value::Stored) -> Record {
        Record::from_unix_ms(
            *key,
            stored.payload,
            stored.head.version,
            stored.head.expires_ms,
        )
        .with_owner(stored.owner)
    }

    /// The live stored value of `key`, decoded.
    async fn fetch(&self, op: Op, key: &Key) -> Result<Option<value::Stored>, StoreError> {
        let cmd = Command {
            head: Head::Name("GET"),
            key: Some(self.key_name(key)),
            args: &[],
        };
        let reply = self.run(op, &cmd, false).await?.reply;
        Self::live(op, reply)
    }

    /// A `GET`'s reply as the live stored value it holds, if any.
    fn live(op: Op, reply: Reply) -> Result<Option<value::Stored>, StoreError> {
        let value = match reply {
            Reply::Nil => return Ok(None),
            Reply::Bulk(value) => value,
            other => return Err(Self::unexpected(op, &other)),
        };
        let stored = value::decode(value)
            .map_err(|e| StoreError::corrupt(Problem::new(op, What::Malformed).caused_by(e)))?;
        // The expiry in the value, against this server's clock: Redis may not have dropped the
        // key yet (its clock, its lazy expiry), or may keep a key whose TTL someone removed.
        if stored.head.expires_ms <= unix_ms(SystemTime::now()) {
            return Ok(None);
        }
        Ok(Some(stored))
    }

    pub(crate) async fn create(&self, record: &Record) -> Result<CreateOutcome, StoreError> {
        let op = Op::on("create", &record.key());
        Self::check_payload(op, record)?;
        let token = self.next_token();
        let expires_ms = clamp_expiry(record.expires_at_unix_ms());
        // The index entry first: a record never exists without it.
        let due = match record.owner() {
            Some(owner) => self.index(op, owner, &record.key(), expires_ms).await?,
            None => Due::default(),
        };
        let outcome = self.create_record(op, record, token, expires_ms).await;
        if let (Ok(_), Some(owner)) = (&outcome, record.owner()) {
            self.sweep(owner, due).await;
        }
        outcome
    }

    async fn create_record(
        &self,
        op: Op,
        record: &Record,
        token: u64,
        expires_ms: u64,
    ) -> Result<CreateOutcome, StoreError> {
        let data = record.data();
        let header = Header::new(
            record.version(),
            expires_ms,
            token,
            data.len(),
            record.owner(),
        );
        let value = Arg::Value(&header, data);
        let key = Some(self.key_name(&record.key()));
        let answer = if T::VALUE_LAST {
            let args = [Arg::Int(expires_ms), value];
            let cmd = Command {
                head: Head::EvalSha(&self.scripts.create),
                key,
                args: &args,
            };
            self.run(op, &cmd, true).await
        } else {
            let args = [
                value,
                Arg::Word("NX"),
                Arg::Word("PXAT"),
                Arg::Int(expires_ms),
                Arg::Word("GET"),
            ];
            let cmd = Command {
                head: Head::Name("SET"),
                key,
                args: &args,
            };
            self.run(op, &cmd, true).await
        };
        let (outcome, retried, acked) = match answer {
            Ok(a) => match create_outcome(&a.reply, record.version(), token) {
                Some(outcome) => (outcome, a.retried, a.acked),
                None => return Err(Self::unexpected(op, &a.reply)),
            },
            // A key of another type, or a value the transport cannot carry, holds the id: taken
            // all the same (a first attempt could not have written it).
            Err(e) if e.is_corrupt() => (CreateOutcome::IdTaken, false, None),
            Err(e) => return Err(e),
        };
        let outcome = settle_create(op, outcome, retried)?;
        if outcome == CreateOutcome::Created {
            self.confirmed(op, acked, retried)?;
        }
        Ok(outcome)
    }

    pub(crate) async fn save(
        &self,
        record: &Record,
        expected_version: u64,
    ) -> Result<SaveOutcome, StoreError> {
        let op = Op::on("save", &record.key());
        Self::check_payload(op, record)?;
        let expires_ms = clamp_expiry(record.expires_at_unix_ms());
        let data = record.data();
        let owner = record.owner();
        let header = Header::new(
            record.version(),
            expires_ms,
            self.next_token(),
            data.len(),
            owner,
        );
        let value = Arg::Value(&header, data);
        // An owned record: the script checks that the owner stays (answering 3 if not).
        let check = if owner.is_some() { "0" } else { "1" };
        let args = [
            Arg::Int(expected_version),
            Arg::Int(expires_ms),
            Arg::Word(check),
            value,
        ];
        let key = record.key();
        let answer = self
            .send_conditional(op, &self.scripts.save, &key, &args)
            .await?;
        let (owner, Reply::Int(3)) = (owner, &answer.reply) else {
            // After a conflict, the layer spreads out its retries.
            return self.sort_conditional(op, answer);
        };
        let Some(owner) = owner else {
            return Err(Self::unexpected(op, &answer.reply));
        };
        // The owner changes: its index entry first, then the save, told not to check again.
        // The first script wrote nothing (even after a lost reply: it answered 3 on the
        // expected version, so no attempt had saved), so this is a first save.
        let due = self.index(op, owner, &key, expires_ms).await?;
        let args = [
            Arg::Int(expected_version),
            Arg::Int(expires_ms),
            Arg::Word("1"),
            value,
        ];
        let answer = self
            .send_conditional(op, &self.scripts.save, &key, &args)
            .await?;
        let outcome = self.sort_conditional(op, answer);
        if outcome.is_ok() {
            self.sweep(owner, due).await;
        }
        outcome
    }

    pub(crate) async fn touch(
        &self,
        key: &Key,
        expected_version: u64,
        expires_at: SystemTime,
    ) -> Result<SaveOutcome, StoreError> {
        let args = [
            Arg::Int(expected_version),
            Arg::Int(clamp_expiry(unix_ms(expires_at))),
        ];
        self.conditional(Op::on("touch", key), &self.scripts.touch, key, &args)
            .await
    }

    pub(crate) async fn remove(
        &self,
        key: &Key,
        expected_version: u64,
    ) -> Result<SaveOutcome, StoreError> {
        let args = [Arg::Int(expected_version)];
        self.conditional(Op::on("remove", key), &self.scripts.remove, key, &args)
            .await
    }

    pub(crate) async fn delete(&self, key: &Key) -> Result<(), StoreError> {
        let op = Op::on("delete", key);
        let cmd = Command {
            head: Head::Name("DEL"),
            key: Some(self.key_name(key)),
            args: &[],
        };
        match self.run(op, &cmd, true).await? {
            // Nothing was there (and no first attempt may have deleted it): nothing to confirm.
            Answer {
                reply: Reply::Int(0),
                retried: false,
                ..
            } => Ok(()),
            Answer {
                reply: Reply::Int(_),
                retried,
                acked,
            } => self.confirmed(op, acked, retried),
            Answer { reply, .. } => Err(Self::unexpected(op, &reply)),
        }
    }

    /// Adds `key` to `owner`'s index with the score `expires_ms` (the [add script](ADD_LUA)),
    /// before the write that gives the record this owner; answers the index's entries due for
    /// a sweep.
    async fn index(
        &self,
        op: Op,
        owner: &str,
        key: &Key,
        expires_ms: u64,
    ) -> Result<Due, StoreError> {
        let now = unix_ms(SystemTime::now());
        let args = [
            Arg::Int(expires_ms),
            Arg::Key(*key),
            Arg::Int(now),
            Arg::Int(SWEEP_LIMIT),
        ];
        let cmd = Command {
            head: Head::EvalSha(&self.scripts.add),
            key: Some(self.index_name(owner)),
            args: &args,
        };
        let op = Op {
            name: "owner index",
            ..op
        };
        let answer = self.run(op, &cmd, true).await?;
        // Replicas must have the entry before the record is written (else a failover could keep
        // the record and lose its entry).
        self.confirmed(op, answer.acked, answer.retried)?;
        let Reply::Array(members) = answer.reply else {
            return Err(Self::unexpected(op, &answer.reply));
        };
        let keys = members
            .iter()
            .filter_map(member_key)
            .filter(|k| k != key)
            .collect();
        Ok(Due { since: now, keys })
    }

    /// Drops the stale entries among `due` (best effort: a failure leaves them for later).
    async fn sweep(&self, owner: &str, due: Due) {
        if due.keys.is_empty() {
            return;
        }
        let mut stale = Vec::new();
        let Ok(loaded) = self.fetch_many(due.keys.iter().copied()).await else {
            return;
        };
        for (&key, got) in due.keys.iter().zip(loaded) {
            match got {
                Ok(Some(stored)) if stored.owner.as_deref() == Some(owner) => {}
                Ok(_) => stale.push(key),
                Err(e) if e.is_corrupt() => stale.push(key),
                Err(_) => {}
            }
        }
        self.drop_stale(owner, due.since, &stale).await;
    }

    /// Every live record of `owner`: the index read whole, each listed session loaded, the
    /// stale entries dropped (see the [module docs](self)).
    pub(crate) async fn owned(&self, owner: &str) -> Result<Vec<Record>, StoreError> {
        let op = Op {
            name: "owner listing",
            session: None,
        };
        // Taken before the index is read: entries scored after it may belong to writes under way.
        let started = unix_ms(SystemTime::now());
        let cmd = Command {
            head: Head::EvalSha(&self.scripts.list),
            key: Some(self.index_name(owner)),
            args: &[],
        };
        let entries = match self.run(op, &cmd, false).await?.reply {
            Reply::Array(entries) => entries,
            other => return Err(Self::unexpected(op, &other)),
        };
        let mut listed = Vec::with_capacity(entries.len() / 2);
        for pair in entries.chunks_exact(2) {
            // A member that is no session key (written by someone else) is left alone.
            let (Some(key), Reply::Bulk(score)) = (member_key(&pair[0]), &pair[1]) else {
                continue;
            };
            let score = std::str::from_utf8(score)
                .ok()
                .and_then(|s| s.parse::<f64>().ok())
                .unwrap_or(f64::INFINITY);
            listed.push((key, score));
        }
        let loaded = self.fetch_many(listed.iter().map(|&(k, _)| k)).await?;
        let mut records = Vec::new();
        let mut stale = Vec::new();
        #[expect(clippy::cast_precision_loss, reason = "ms instants are below 2^53")]
        let due = |score: f64| score <= started as f64;
        for (&(key, score), got) in listed.iter().zip(loaded) {
            let not_ours = match got {
                Ok(Some(stored)) if stored.owner.as_deref() == Some(owner) => {
                    records.push(Self::record(&key, stored));
                    false
                }
                Ok(_) => true,
                // A value that is not a session, or a key of another type: not the owner's.
                Err(e) if e.is_corrupt() => true,
                Err(e) => return Err(e),
            };
            if not_ours && due(score) {
                stale.push(key);
            }
        }
        self.drop_stale(owner, started, &stale).await;
        Ok(records)
    }

    /// The live stored values of `keys`, in order: by `MGET`s of [`MGET_KEYS`] keys,
    /// [`MGETS_UNDER_WAY`] at a time, on a transport to [one node](Transport::one_node), else
    /// loaded together (a batch of `GET`s on the wire), at most
    /// [`Transport::CONCURRENT_LOADS`] at a time.
    async fn fetch_many(
        &self,
        keys: impl Iterator<Item = Key>,
    ) -> Result<Vec<Result<Option<value::Stored>, StoreError>>, StoreError> {
        use futures_util::StreamExt;
        use futures_util::stream::FuturesOrdered;

        if !self.transport.one_node() {
            return Ok(self.fetch_each(keys).await);
        }
        let keys: Vec<Key> = keys.collect();
        let mut out = Vec::with_capacity(keys.len());
        // Answered in order: the first batch to fail, in the keys' order, is the error (those
        // after it are dropped unanswered), as when they went one at a time.
        let mut batches = keys.chunks(MGET_KEYS);
        let mut running = FuturesOrdered::new();
        for batch in batches.by_ref().take(MGETS_UNDER_WAY) {
            running.push_back(self.mget(batch));
        }
        while let Some(batch) = running.next().await {
            if let Some(next) = batches.next() {
                running.push_back(self.mget(next));
            }
            out.extend(batch?);
        }
        Ok(out)
    }

    /// `MGET` of `keys`, in order (a key of another type answers nil: missing).
    async fn mget(
        &self,
        keys: &[Key],
    ) -> Result<Vec<Result<Option<value::Stored>, StoreError>>, StoreError> {
        let op = Op {
            name: "owner listing load",
            session: None,
        };
        let Some((first, rest)) = keys.split_first() else {
            return Ok(Vec::new());
        };
        let args: Vec<Arg<'_>> = rest.iter().map(|k| Arg::Name(self.key_name(k))).collect();
        let cmd = Command {
            head: Head::Name("MGET"),
            key: Some(self.key_name(first)),
            args: &args,
        };
        let replies = match self.run(op, &cmd, false).await?.reply {
            Reply::Array(replies) if replies.len() == keys.len() => replies,
            other => return Err(Self::unexpected(op, &other)),
        };
        Ok(keys
            .iter()
            .zip(replies)
            .map(|(key, reply)| Self::live(Op::on("owner listing load", key), reply))
            .collect())
    }

    /// The live stored values of `keys`, in order, each by a `GET` of its own, at most
    /// [`Transport::CONCURRENT_LOADS`] under way at a time.
    async fn fetch_each(
        &self,
        keys: impl Iterator<Item = Key>,
    ) -> Vec<Result<Option<value::Stored>, StoreError>> {
        use futures_util::StreamExt;
        use futures_util::stream::FuturesUnordered;

        let mut keys = keys.enumerate();
        let mut out = Vec::new();
        let mut running = FuturesUnordered::new();
        let fetch = |(i, key): (usize, Key)| async move {
            (
                i,
                self.fetch(Op::on("owner listing load", &key), &key).await,
            )
        };
        for next in keys.by_ref().take(T::CONCURRENT_LOADS) {
            running.push(fetch(next));
        }
        while let Some((i, got)) = running.next().await {
            if out.len() <= i {
                out.resize_with(i + 1, || None);
            }
            out[i] = Some(got);
            if let Some(next) = keys.next() {
                running.push(fetch(next));
            }
        }
        out.into_iter().map(|got| got.unwrap_or(Ok(None))).collect()
    }

    /// Drops `stale` entries from `owner`'s index, each only if its score is still at most
    /// `since` (the [drop script](DROP_LUA)). Best effort: entries left are dropped by a later
    /// listing or sweep, and a failure here changes no answer.
    async fn drop_stale(&self, owner: &str, since: u64, stale: &[Key]) {
        let op = Op {
            name: "owner index sweep",
            session: None,
        };
        for batch in stale.chunks(DROP_BATCH) {
            let mut args = Vec::with_capacity(batch.len() + 1);
            args.push(Arg::Int(since));
            args.extend(batch.iter().map(|&k| Arg::Key(k)));
            let cmd = Command {
                head: Head::EvalSha(&self.scripts.drop),
                key: Some(self.index_name(owner)),
                args: &args,
            };
            if let Err(e) = self.run(op, &cmd, false).await {
                log::debug!("stale owner index entries left for a later sweep: {e}");
                return;
            }
        }
    }

    /// Runs a conditional script (`save`, `touch`, `remove`) and sorts its answer.
    async fn conditional(
        &self,
        op: Op,
        script: &Script,
        key: &Key,
        args: &[Arg<'_>],
    ) -> Result<SaveOutcome, StoreError> {
        let answer = self.send_conditional(op, script, key, args).await?;
        self.sort_conditional(op, answer)
    }

    /// Runs a conditional script.
    async fn send_conditional(
        &self,
        op: Op,
        script: &Script,
        key: &Key,
        args: &[Arg<'_>],
    ) -> Result<Answer, StoreError> {
        let cmd = Command {
            head: Head::EvalSha(script),
            key: Some(self.key_name(key)),
            args,
        };
        self.run(op, &cmd, true).await
    }

    /// What a conditional script's answer says.
    fn sort_conditional(&self, op: Op, answer: Answer) -> Result<SaveOutcome, StoreError> {
        let outcome = match answer.reply {
            Reply::Int(0) => SaveOutcome::Missing,
            Reply::Int(1) => SaveOutcome::Conflict,
            Reply::Int(2) => SaveOutcome::Saved,
            other => return Err(Self::unexpected(op, &other)),
        };
        let outcome = settle(op, outcome, answer.retried)?;
        if outcome == SaveOutcome::Saved {
            self.confirmed(op, answer.acked, answer.retried)?;
        }
        Ok(outcome)
    }

    /// Sends `cmd` and waits for its reply: once more after a broken or refused connection,
    /// all within the timeout. A write is followed by `WAIT` when replicas must acknowledge it.
    async fn run(&self, op: Op, cmd: &Command<'_>, write: bool) -> Result<Answer, StoreError> {
        let wait_args;
        let wait = match self.acks {
            Some(acks) if write => {
                let ms = u64::try_from(acks.timeout.as_millis()).unwrap_or(u64::MAX);
                wait_args = [Arg::Int(acks.replicas), Arg::Int(ms)];
                Some(Command {
                    head: Head::Name("WAIT"),
                    key: None,
                    args: &wait_args,
                })
            }
            _ => None,
        };
        let wait = wait.as_ref();
        // Pinned where it is built: a timeout future would move the whole attempt (mostly the
        // transport's request future) into itself.
        let deadline = Instant::now() + self.timeout;
        let mut attempt = pin!(async {
            // Not matched on directly: a scrutinee's temporaries (the first attempt's future)
            // would stay alive, and in this future's size, through the second attempt.
            let first = self.attempt(cmd, wait, deadline).await;
            match first {
                Err(SendError::Broken(_)) => (self.attempt(cmd, wait, deadline).await, true),
                Err(SendError::NotSent(_)) => (self.attempt(cmd, wait, deadline).await, false),
                other => (other, false),
            }
        });
        let timed_out =
            || StoreError::unavailable(Problem::new(op, What::TimedOut(T::NAME, self.timeout)));
        let (sent, retried) = if self.transport.keeps_deadline() {
            attempt.await
        } else {
            let mut timer = pin!(tokio::time::sleep_until(deadline.into()));
            let done = poll_fn(|cx| {
                if let Poll::Ready(done) = attempt.as_mut().poll(cx) {
                    return Poll::Ready(Some(done));
                }
                timer.as_mut().poll(cx).map(|()| None)
            })
            .await;
            done.ok_or_else(timed_out)?
        };
        let sent = match sent {
            Err(SendError::TimedOut) => return Err(timed_out()),
            sent => sent.map_err(|e| Self::failed(op, e))?,
        };
        let acked = match sent.then {
            None => wait.map(|_| 0),
            Some(Reply::Int(n)) => Some(n),
            Some(other) => return Err(Self::unexpected(Op { name: "WAIT", ..op }, &other)),
        };
        Ok(Answer {
            reply: sent.reply,
            retried,
            acked,
        })
    }

    /// Sends `cmd` once; a script the server lacks, once more by its source.
    async fn attempt(
        &self,
        cmd: &Command<'_>,
        wait: Option<&Command<'_>>,
        deadline: Instant,
    ) -> Result<Sent, SendError> {
        let first = self.transport.send(cmd, wait, deadline).await;
        match (first, cmd.head) {
            (Err(SendError::Server(e)), Head::EvalSha(script)) if e.code() == "NOSCRIPT" => {
                let eval = Command {
                    head: Head::Eval(script),
                    ..*cmd
                };
                self.transport.send(&eval, wait, deadline).await
            }
            (other, _) => other,
        }
    }

    fn failed(op: Op, e: SendError) -> StoreError {
        failed(T::NAME, op, e)
    }

    fn unexpected(op: Op, reply: &Reply) -> StoreError {
        StoreError::other(Problem::new(op, What::Unexpected(T::NAME, reply.kind())))
    }

    /// Refuses a record this transport could not read back whole.
    fn check_payload(op: Op, record: &Record) -> Result<(), StoreError> {
        if let Some(owner) = record.owner() {
            if owner.len() > value::MAX_OWNER_LEN {
                return Err(StoreError::other(Problem::new(op, What::OwnerTooLong)));
            }
            if !T::BINARY_SAFE && owner.contains('\0') {
                return Err(StoreError::other(Problem::new(op, What::TextOnly(T::NAME))));
            }
        }
        let data = record.data();
        if !T::BINARY_SAFE && (std::str::from_utf8(data).is_err() || data.contains(&0)) {
            return Err(StoreError::other(Problem::new(op, What::TextOnly(T::NAME))));
        }
        Ok(())
    }

    fn next_token(&self) -> u64 {
        self.tokens.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether a write that changed the record may be acknowledged: always without
    /// [`Acks`]; with them, only if `WAIT` counted enough replicas on the write's own attempt.
    fn confirmed(&self, op: Op, acked: Option<i64>, retried: bool) -> Result<(), StoreError> {
        let Some(acks) = self.acks else {
            return Ok(());
        };
        match acked {
            Some(n) if !retried && u64::try_from(n).is_ok_and(|n| n >= acks.replicas) => Ok(()),
            _ => Err(StoreError::unavailable(Problem::new(
                op,
                What::NotReplicated {
                    acked: if retried { None } else { acked },
                    wanted: acks.replicas,
                    timeout: acks.timeout,
                },
            ))),
        }
    }
}

/// Sorts a transport's failure into the store's kinds.
fn failed(transport: &'static str, op: Op, e: SendError) -> StoreError {
    let failed = |cause| Problem::new(op, What::Failed(transport)).caused_by(cause);
    match e {
        SendError::Broken(cause) | SendError::NotSent(cause) | SendError::Unavailable(cause) => {
            StoreError::unavailable(failed(cause))
        }
        SendError::TimedOut => StoreError::unavailable(failed(Box::new(std::io::Error::from(
            std::io::ErrorKind::TimedOut,
        )))),
        SendError::Corrupt(cause) => StoreError::corrupt(failed(cause)),
        SendError::Other(cause) => StoreError::other(failed(cause)),
        SendError::Server(e) if e.is_unavailable() => {
            StoreError::unavailable(Problem::new(op, What::Server(e)))
        }
        SendError::Server(e) => StoreError::other(Problem::new(op, What::Server(e))),
    }
}

const OPEN: Op = Op {
    name: "connection",
    session: None,
};

/// A store that cannot be set up through `transport` (a bad URL, no connection), sorted as a
/// failed command is.
pub(crate) fn opening_failed(transport: &'static str, e: SendError) -> StoreError {
    failed(transport, OPEN, e)
}

/// What a create's reply (`SET ... NX GET`'s) says: nil, created; an old value, taken, unless
/// it is this very write's (its version and token), applied by an earlier attempt whose reply
/// was lost. `None` for a reply `SET` does not send.
fn create_outcome(reply: &Reply, version: u64, token: u64) -> Option<CreateOutcome> {
    match reply {
        Reply::Nil | Reply::Status => Some(CreateOutcome::Created),
        Reply::Bulk(old) => Some(match value::parse_head(old) {
            Ok(head) if head.version == version && head.token == token => CreateOutcome::Created,
            _ => CreateOutcome::IdTaken,
        }),
        Reply::Int(_) | Reply::Array(_) => None,
    }
}

/// What a conditional write may report. After a retry (the first attempt's reply was lost: the
/// connection broke after the command was sent), `Conflict` or `Missing` may be the first
/// attempt's own effect seen from outside (another writer saved on top of it, or it deleted
/// the record): the outcome is unknown, which is [`StoreError::unavailable`], so that the layer
/// neither replays the request's changes nor reports a false conflict. `Saved` is certain
/// either way.
fn settle(op: Op, outcome: SaveOutcome, retried: bool) -> Result<SaveOutcome, StoreError> {
    if retried && outcome != SaveOutcome::Saved {
        return Err(StoreError::unavailable(Problem::new(
            op,
            What::OutcomeUnknown,
        )));
    }
    Ok(outcome)
}

/// What a create may report: as [`settle`], `IdTaken` after a retry may be the first attempt's
/// own record, changed since by another writer.
fn settle_create(
    op: Op,
    outcome: CreateOutcome,
    retried: bool,
) -> Result<CreateOutcome, StoreError> {
    if retried && outcome != CreateOutcome::Created {
        return Err(StoreError::unavailable(Problem::new(
            op,
            What::OutcomeUnknown,
        )));
    }
    Ok(outcome)
}

/// A failed operation of the family, as a [`StoreError`]'s cause: the operation, the session's
/// key [fingerprint](Key::fingerprint) at most, and what happened; never a reply's contents or
/// an error reply's free text.
pub(crate) struct Problem {
    op: Op,
    what: What,
    cause: Option<Cause>,
}

#[derive(Debug)]
enum What {
    /// A write's reply was lost, and its retry cannot tell whether the first attempt applied.
    OutcomeUnknown,
    /// `WAIT` did not confirm the write on enough replicas (`acked` is `None` for a retry).
    NotReplicated {
        acked: Option<i64>,
        wanted: u64,
        timeout: Duration,
    },
    /// No answer within the timeout.
    TimedOut(&'static str, Duration),
    /// Redis answered with an error.
    Server(ServerError),
    /// A reply of a kind the command does not send.
    Unexpected(&'static str, String),
    /// The stored value is not in the layout (the cause says where).
    Malformed,
    /// The transport failed (the cause says how).
    Failed(&'static str),
    /// A payload the transport could not read back.
    TextOnly(&'static str),
    /// An owner longer than a value holds.
    OwnerTooLong,
}

impl Problem {
    fn new(op: Op, what: What) -> Problem {
        Problem {
            op,
            what,
            cause: None,
        }
    }

    fn caused_by(mut self, cause: impl Into<Cause>) -> Problem {
        self.cause = Some(cause.into());
        self
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = self.op.name;
        match &self.what {
            What::OutcomeUnknown => write!(
                f,
                "outcome unknown: the connection broke after a {op} was sent, and its retry \
                 found the record changed; the first attempt may have been applied"
            ),
            What::NotReplicated {
                acked: Some(acked),
                wanted,
                timeout,
            } => write!(
                f,
                "durability unknown: a {op} reached {acked} of the {wanted} replicas asked for \
                 within {timeout:?}; it may be applied, and may be lost on a failover"
            ),
            What::NotReplicated {
                acked: None,
                wanted,
                ..
            } => write!(
                f,
                "durability unknown: a {op} was retried after a broken connection, so WAIT \
                 cannot confirm it on {wanted} replicas; it may be applied, and may be lost on \
                 a failover"
            ),
            What::TimedOut(transport, after) => {
                write!(f, "{transport} did not answer a {op} within {after:?}")
            }
            What::Server(e) => write!(f, "redis answered a {op} with {e}"),
            What::Unexpected(transport, kind) => {
                write!(f, "unexpected {transport} reply to a {op}: {kind}")
            }
            What::Malformed => write!(f, "a {op} found a value that is not a session record"),
            What::Failed(transport) => write!(f, "{transport} {op} failed"),
            What::OwnerTooLong => write!(
                f,
                "a {op} was not sent: its owner is longer than {} bytes",
                value::MAX_OWNER_LEN
            ),
            What::TextOnly(transport) => write!(
                f,
                "the {transport} store keeps UTF-8 text without NUL bytes only (its replies \
                 cannot carry other bytes); the {op} was not sent"
            ),
        }?;
        match self.op.session {
            Some(key) => write!(f, " (session {})", key.fingerprint()),
            None => Ok(()),
        }
    }
}

impl fmt::Debug for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // What happened in words, as `Display` says it (a `Debug` of the parts would hide it).
        f.debug_struct("Problem")
            .field("message", &self.to_string())
            .field("cause", &self.cause)
            .finish_non_exhaustive()
    }
}

impl std::error::Error for Problem {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause
            .as_ref()
            .map(|c| &**c as &(dyn std::error::Error + 'static))
    }
}

/// Implements [`SessionStore`](crate::SessionStore) for a store of the family by handing each
/// operation to the [`Protocol`] in its field `protocol` (its futures as they are: one `async`
/// layer less keeps callers' futures within the compiler's default recursion limit).
macro_rules! session_store_on_protocol {
    ($store:ty) => {
        impl $crate::store::SessionStore for $store {
            fn load(
                &self,
                key: &$crate::key::Key,
            ) -> impl std::future::Future<
                Output = Result<Option<$crate::store::Record>, $crate::error::StoreError>,
            > + Send {
                self.protocol.load(key)
            }

            fn create(
                &self,
                record: &$crate::store::Record,
            ) -> impl std::future::Future<
                Output = Result<$crate::store::CreateOutcome, $crate::error::StoreError>,
            > + Send {
                self.protocol.create(record)
            }

            fn save(
                &self,
                record: &$crate::store::Record,
                expected_version: u64,
            ) -> impl std::future::Future<
                Output = Result<$crate::store::SaveOutcome, $crate::error::StoreError>,
            > + Send {
                self.protocol.save(record, expected_version)
            }

            fn touch(
                &self,
                key: &$crate::key::Key,
                expected_version: u64,
                expires_at: std::time::SystemTime,
            ) -> impl std::future::Future<
                Output = Result<$crate::store::SaveOutcome, $crate::error::StoreError>,
            > + Send {
                self.protocol.touch(key, expected_version, expires_at)
            }

            fn remove(
                &self,
                key: &$crate::key::Key,
                expected_version: u64,
            ) -> impl std::future::Future<
                Output = Result<$crate::store::SaveOutcome, $crate::error::StoreError>,
            > + Send {
                self.protocol.remove(key, expected_version)
            }

            fn delete(
                &self,
                key: &$crate::key::Key,
            ) -> impl std::future::Future<Output = Result<(), $crate::error::StoreError>> + Send
            {
                self.protocol.delete(key)
            }

            fn owned(
                &self,
                owner: &str,
            ) -> impl std::future::Future<
                Output = Result<Vec<$crate::store::Record>, $crate::error::StoreError>,
            > + Send {
                self.protocol.owned(owner)
            }
        }
    };
}
pub(crate) use session_store_on_protocol;

#[cfg(test)]
mod tests {
    use super::*;

    fn op() -> Op {
        Op::on("save", &Key::random())
    }

    #[test]
    fn scripts_are_named_by_their_sha1() {
        // SHA1 of the empty string, as `redis-cli script load ""` answers.
        assert_eq!(
            Script::new("").sha,
            "da39a3ee5e6b4b0d3255bfef95601890afd80709"
        );
        let s = Script::new(SAVE_LUA);
        assert_eq!(s.sha.len(), 40);
        assert_ne!(s.sha, Script::new(TOUCH_LUA).sha);
    }

    #[test]
    fn the_scripts_read_the_values_header() {
        for script in [SAVE_LUA, TOUCH_LUA, REMOVE_LUA] {
            assert!(script.contains(lua_header_pattern!()), "{script}");
        }
        // The pattern's counted digits are the layout's.
        let pattern = lua_header_pattern!();
        assert_eq!(pattern.matches("%d").count(), 1 + value::EXPIRY_DIGITS);
        assert_eq!(pattern.matches("%x").count(), 16);
    }

    #[test]
    fn the_save_script_reads_a_whole_owned_header() {
        const { assert!(value::MAX_OWNED_HEADER_LEN <= 512) };
        assert!(SAVE_LUA.contains("'0' and 511 or 63"));
    }

    #[test]
    fn index_members_are_session_keys_in_hex() {
        let key = Key::random();
        let member = Reply::Bulk(Bytes::from(key.to_hex()));
        assert_eq!(member_key(&member), Some(key));
        for foreign in [
            Reply::Bulk(Bytes::from(key.to_hex().to_uppercase())),
            Reply::Bulk(Bytes::from(key.to_hex()[1..].to_owned())),
            Reply::Bulk(Bytes::from(format!("{}0", key.to_hex()))),
            Reply::Bulk(Bytes::from_static(b"zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz")),
            Reply::Int(1),
        ] {
            assert_eq!(member_key(&foreign), None);
        }
    }

    #[test]
    fn create_recognises_its_own_write() {
        let header = Header::new(1, 1_764_590_400_000, 0xabc, 2, None);
        let mut mine = header.as_bytes().to_vec();
        mine.extend_from_slice(b"{}");
        let mine = Reply::Bulk(Bytes::from(mine));
        assert_eq!(
            create_outcome(&Reply::Nil, 1, 0xabc),
            Some(CreateOutcome::Created)
        );
        assert_eq!(
            create_outcome(&mine, 1, 0xabc),
            Some(CreateOutcome::Created)
        );
        // Another write's token or version, a moved expiry notwithstanding.
        assert_eq!(
            create_outcome(&mine, 1, 0xabd),
            Some(CreateOutcome::IdTaken)
        );
        assert_eq!(
            create_outcome(&mine, 2, 0xabc),
            Some(CreateOutcome::IdTaken)
        );
        let touched = Header::new(1, 1_764_590_999_999, 0xabc, 2, None);
        assert_eq!(
            create_outcome(
                &Reply::Bulk(Bytes::copy_from_slice(touched.as_bytes())),
                1,
                0xabc
            ),
            Some(CreateOutcome::Created)
        );
        for foreign in [
            Reply::Bulk(Bytes::from_static(b"{\"d\":{}}")),
            Reply::Bulk(Bytes::new()),
        ] {
            assert_eq!(
                create_outcome(&foreign, 1, 0xabc),
                Some(CreateOutcome::IdTaken)
            );
        }
        assert_eq!(create_outcome(&Reply::Int(1), 1, 0xabc), None);
    }

    #[test]
    fn a_retried_write_that_does_not_find_itself_is_unknown() {
        assert_eq!(
            settle(op(), SaveOutcome::Conflict, false).unwrap(),
            SaveOutcome::Conflict
        );
        assert_eq!(
            settle(op(), SaveOutcome::Saved, true).unwrap(),
            SaveOutcome::Saved
        );
        for outcome in [SaveOutcome::Conflict, SaveOutcome::Missing] {
            let e = settle(op(), outcome, true).unwrap_err();
            assert!(e.is_unavailable());
            let cause = std::error::Error::source(&e).unwrap().to_string();
            assert!(cause.starts_with("outcome unknown"), "{cause}");
        }
        assert!(settle_create(op(), CreateOutcome::IdTaken, true).is_err());
        assert_eq!(
            settle_create(op(), CreateOutcome::IdTaken, false).unwrap(),
            CreateOutcome::IdTaken
        );
    }

    #[test]
    fn error_replies_are_quoted_by_their_code_only() {
        let e = ServerError::from_code("ERR");
        assert_eq!(e.to_string(), "an error reply ERR");
        assert_eq!(ServerError::from_code("").code(), "(unnamed)");
        assert_eq!(ServerError::from_code("{\"d\":1}").code(), "(unnamed)");
        for (code, unavailable) in [
            ("OOM", true),
            ("LOADING", true),
            ("READONLY", true),
            ("WRONGTYPE", false),
            ("NOSCRIPT", false),
            ("ERR", false),
        ] {
            assert_eq!(
                ServerError::from_code(code).is_unavailable(),
                unavailable,
                "{code}"
            );
        }
        assert!(matches!(
            SendError::from(ServerError::from_code("WRONGTYPE")),
            SendError::Corrupt(_)
        ));
        assert!(matches!(
            SendError::from(ServerError::from_code("NOSCRIPT")),
            SendError::Server(_)
        ));
    }

    #[test]
    fn messages_name_the_session_by_its_fingerprint_only() {
        let key = Key::random();
        let p = Problem::new(
            Op::on("load", &key),
            What::Unexpected("redis", Reply::Bulk(Bytes::from_static(b"secret")).kind()),
        );
        let text = p.to_string();
        assert!(text.contains(key.fingerprint().as_str()), "{text}");
        assert!(!text.contains(&key.to_hex()), "{text}");
        assert!(!text.contains("secret"), "{text}");
        assert!(
            text.ends_with(&format!(
                "a bulk string of 6 bytes (session {})",
                key.fingerprint()
            )),
            "{text}"
        );
        assert_eq!(Reply::Array(vec![Reply::Nil; 3]).kind(), "an array of 3");
    }
}
