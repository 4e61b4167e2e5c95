//! The Redis store's own connections to a single node: RESP2 over TCP, written and read by the
//! request that sends the command, one command (or a command and its `WAIT`) at a time per
//! connection, the idle ones kept in a small pool.
//!
//! Why not the `redis` crate's `MultiplexedConnection` (which the store still uses for a
//! cluster, Sentinel, TLS, Unix sockets and `with_connection_manager`): it hands every command
//! to a task of its own through a channel and the reply back through another, and parses with a
//! general combinator parser. For one `GET` that is about 10,000 instructions on the
//! application's core beyond the socket calls (measured with callgrind: the driver task 5,000,
//! the channels and the task switches 3,000, its command packing 800; see the README); here the
//! request writes its command into a reused buffer, reads the reply itself and parses it with
//! [`resp::parse`](super::resp::parse), about 1,500.
//!
//! A request that is dropped while it waits (the store's command timeout) drops its connection
//! with it, so no connection is ever left between a command and its reply.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::protocol::{Arg, Command, Head, Reply, SendError, Sent, ServerError};
use super::resp::{self, Parsed};

/// How many connections one store opens at most; a request that finds all of them busy waits
/// for one (within the command timeout).
const MAX_CONNECTIONS: usize = 128;

/// How many idle connections are kept for the next requests.
const MAX_IDLE: usize = 32;

/// The first room a connection's read buffer has.
const READ_BUF: usize = 4096;

/// Connections to one Redis node.
pub(crate) struct Direct {
    host: String,
    port: u16,
    /// `AUTH` and `SELECT`, as sent on every new connection, and how many replies they get.
    setup: Vec<u8>,
    setup_replies: usize,
    connect_timeout: Duration,
    idle: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
}

/// One connection, with its buffers (kept between commands: no allocation per command once
/// warm).
struct Connection {
    stream: TcpStream,
    out: Vec<u8>,
    input: BytesMut,
}

/// Why a connection's setup failed (`Debug` says it in words too).
struct SetupRefused(ServerError);

impl std::fmt::Display for SetupRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "redis refused the connection's setup (authentication failed, or no such \
             database): {}",
            self.0
        )
    }
}

impl std::fmt::Debug for SetupRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SetupRefused({self})")
    }
}

impl std::error::Error for SetupRefused {}

impl Direct {
    /// Connections to `host:port`, each authenticated (`AUTH [username] password`) and on
    /// database `db` if these are given.
    pub(crate) fn new(
        host: String,
        port: u16,
        username: Option<&str>,
        password: Option<&str>,
        db: i64,
        connect_timeout: Duration,
    ) -> Direct {
        let mut setup = Vec::new();
        let mut setup_replies = 0;
        if let Some(password) = password {
            let mut args: Vec<&[u8]> = vec![b"AUTH"];
            if let Some(username) = username {
                args.push(username.as_bytes());
            }
            args.push(password.as_bytes());
            encode_raw(&mut setup, &args);
            setup_replies += 1;
        }
        if db != 0 {
            let db = itoa::Buffer::new().format(db).to_owned();
            encode_raw(&mut setup, &[b"SELECT", db.as_bytes()]);
            setup_replies += 1;
        }
        Direct {
            host,
            port,
            setup,
            setup_replies,
            connect_timeout,
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
        }
    }

    /// Sends `cmd` (and `then` after it, in the same write) and reads their replies.
    pub(crate) async fn send(
        &self,
        cmd: &Command<'_>,
        then: Option<&Command<'_>>,
    ) -> Result<Sent, SendError> {
        let permit = match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => Arc::clone(&self.permits)
                .acquire_owned()
                .await
                .map_err(|e| SendError::Other(Box::new(e)))?,
        };
        let idle = self.lock().pop();
        let mut conn = match idle {
            Some(conn) => conn,
            None => self.connect().await?,
        };
        match conn.exchange(cmd, then).await {
            Ok((reply, then)) => {
                self.put_back(conn, permit);
                Ok(Sent {
                    reply: reply?,
                    then: then.and_then(Result::ok),
                })
            }
            Err(e) => {
                if let SendError::Broken(_) = e {
                    // The server closed this connection (a restart, a failover, its idle
                    // timeout): the idle ones are most likely closed too, and each would cost a
                    // request its first attempt.
                    self.lock().clear();
                }
                Err(e)
            }
        }
    }

    /// A new connection, set up. A failure means the command was never sent.
    async fn connect(&self) -> Result<Connection, SendError> {
        let connect = TcpStream::connect((self.host.as_str(), self.port));
        let stream = tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| {
                SendError::NotSent(Box::new(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no connection to {}:{} within {:?}",
                        self.host, self.port, self.connect_timeout
                    ),
                )))
            })?
            .map_err(|e| SendError::NotSent(Box::new(e)))?;
        // Commands are small and answered at once: no waiting for more to fill a packet.
        stream
            .set_nodelay(true)
            .map_err(|e| SendError::NotSent(Box::new(e)))?;
        let mut conn = Connection {
            stream,
            out: Vec::with_capacity(256),
            input: BytesMut::with_capacity(READ_BUF),
        };
        if self.setup_replies > 0 {
            let not_sent = |e: SendError| match e {
                SendError::Broken(e) => SendError::NotSent(e),
                other => other,
            };
            conn.stream
                .write_all(&self.setup)
                .await
                .map_err(|e| SendError::NotSent(Box::new(e)))?;
            for _ in 0..self.setup_replies {
                if let Err(e) = conn.read().await.map_err(not_sent)? {
                    return Err(SendError::Other(Box::new(SetupRefused(e))));
                }
            }
        }
        Ok(conn)
    }

    /// Keeps `conn` for the next request, if it has nothing left to read and there is room.
    fn put_back(&self, conn: Connection, permit: OwnedSemaphorePermit) {
        if conn.input.is_empty() {
            let mut idle = self.lock();
            if idle.len() < MAX_IDLE {
                idle.push(conn);
            }
        }
        drop(permit);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Connection>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A command's reply and its follower's, each a reply or an error reply.
type Replied = (
    Result<Reply, ServerError>,
    Option<Result<Reply, ServerError>>,
);

impl Connection {
    /// Writes `cmd` (and `then`) and reads their replies (an error reply leaves the connection
    /// fine).
    async fn exchange(
        &mut self,
        cmd: &Command<'_>,
        then: Option<&Command<'_>>,
    ) -> Result<Replied, SendError> {
        self.out.clear();
        encode(&mut self.out, cmd);
        if let Some(then) = then {
            encode(&mut self.out, then);
        }
        self.stream
            .write_all(&self.out)
            .await
            .map_err(|e| SendError::Broken(Box::new(e)))?;
        let reply = self.read().await?;
        let then = match then {
            Some(_) => Some(self.read().await?),
            None => None,
        };
        Ok((reply, then))
    }

    /// The next reply: a reply, or the error reply Redis sent (the connection is fine either
    /// way); `Err` when the connection broke or is out of step (it is then dropped).
    async fn read(&mut self) -> Result<Result<Reply, ServerError>, SendError> {
        loop {
            match resp::parse(&self.input) {
                Ok(Some((parsed, len))) => {
                    let frame = self.input.split_to(len).freeze();
                    return Ok(reply(parsed, &frame));
                }
                Ok(None) => {}
                Err(e) => return Err(SendError::Other(Box::new(e))),
            }
            if self.input.capacity() - self.input.len() < READ_BUF / 2 {
                self.input.reserve(READ_BUF);
            }
            match self.stream.read_buf(&mut self.input).await {
                Ok(0) => {
                    return Err(SendError::Broken(Box::new(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "redis closed the connection before its reply",
                    ))));
                }
                Ok(_) => {}
                Err(e) => return Err(SendError::Broken(Box::new(e))),
            }
        }
    }
}

/// A parsed reply as the protocol's, its bulk strings slices of `frame` (no copy).
fn reply(parsed: Parsed, frame: &Bytes) -> Result<Reply, ServerError> {
    Ok(match parsed {
        Parsed::Nil => Reply::Nil,
        Parsed::Int(n) => Reply::Int(n),
        Parsed::Status => Reply::Status,
        Parsed::Bulk(range) => Reply::Bulk(frame.slice(range)),
        Parsed::Error(e) => return Err(e),
        Parsed::Array(items) => Reply::Array(
            items
                .into_iter()
                .map(|item| reply(item, frame))
                .collect::<Result<_, _>>()?,
        ),
    })
}

/// Appends `cmd` in RESP2 (an array of bulk strings) to `out`.
fn encode(out: &mut Vec<u8>, cmd: &Command<'_>) {
    let count = match cmd.head {
        Head::Name(_) => 1,
        Head::EvalSha(_) | Head::Eval(_) => 3,
    } + usize::from(cmd.key.is_some())
        + cmd.args.len();
    out.push(b'*');
    out.extend_from_slice(itoa::Buffer::new().format(count).as_bytes());
    out.extend_from_slice(b"\r\n");
    bulk(out, cmd.head.name().as_bytes());
    match cmd.head {
        Head::Name(_) => {}
        Head::EvalSha(script) => {
            bulk(out, script.sha.as_bytes());
            bulk(out, b"1");
        }
        Head::Eval(script) => {
            bulk(out, script.source.as_bytes());
            bulk(out, b"1");
        }
    }
    if let Some(key) = cmd.key {
        bulk_header(out, key.len());
        key.write(out);
        out.extend_from_slice(b"\r\n");
    }
    for arg in cmd.args {
        match *arg {
            Arg::Word(word) => bulk(out, word.as_bytes()),
            Arg::Int(n) => bulk(out, itoa::Buffer::new().format(n).as_bytes()),
            Arg::Value(header, data) => {
                bulk_header(out, header.as_bytes().len() + data.len());
                out.extend_from_slice(header.as_bytes());
                out.extend_from_slice(data);
                out.extend_from_slice(b"\r\n");
            }
            Arg::Source(source) => bulk(out, source.as_bytes()),
        }
    }
}

/// Appends a command of plain arguments.
fn encode_raw(out: &mut Vec<u8>, args: &[&[u8]]) {
    out.push(b'*');
    out.extend_from_slice(itoa::Buffer::new().format(args.len()).as_bytes());
    out.extend_from_slice(b"\r\n");
    for arg in args {
        bulk(out, arg);
    }
}

fn bulk(out: &mut Vec<u8>, bytes: &[u8]) {
    bulk_header(out, bytes.len());
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
}

fn bulk_header(out: &mut Vec<u8>, len: usize) {
    out.push(b'$');
    out.extend_from_slice(itoa::Buffer::new().format(len).as_bytes());
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::Key;
    use crate::store::redis::protocol::KeyName;
    use crate::store::redis::value::Header;

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let key = Key::random();
        let header = Header::new(2, 5, 1, 2);
        let args = [
            Arg::Value(&header, b"{}"),
            Arg::Word("NX"),
            Arg::Word("PXAT"),
            Arg::Int(5),
        ];
        let cmd = Command {
            head: Head::Name("SET"),
            key: Some(KeyName { prefix: "s:", key }),
            args: &args,
        };
        let mut out = Vec::new();
        encode(&mut out, &cmd);
        let value = [header.as_bytes(), b"{}"].concat();
        let want = format!(
            "*6\r\n$3\r\nSET\r\n$34\r\ns:{}\r\n${}\r\n{}\r\n$2\r\nNX\r\n$4\r\nPXAT\r\n$1\r\n5\r\n",
            key.to_hex(),
            value.len(),
            String::from_utf8(value).unwrap()
        );
        assert_eq!(String::from_utf8(out).unwrap(), want);
        let mut raw = Vec::new();
        encode_raw(&mut raw, &[b"AUTH", b"u", b"p w"]);
        assert_eq!(raw, b"*3\r\n$4\r\nAUTH\r\n$1\r\nu\r\n$3\r\np w\r\n");
    }

    #[test]
    fn bulk_replies_share_the_read_buffer() {
        let frame = Bytes::from_static(b"*2\r\n$3\r\nabc\r\n-NOSCRIPT No matching\r\n");
        let (parsed, _) = resp::parse(&frame).unwrap().unwrap();
        assert_eq!(
            reply(parsed, &frame),
            Err(ServerError::from_code("NOSCRIPT"))
        );
        let frame = Bytes::from_static(b"$3\r\nabc\r\n");
        let (parsed, _) = resp::parse(&frame).unwrap().unwrap();
        let Ok(Reply::Bulk(bulk)) = reply(parsed, &frame) else {
            panic!("not a bulk string");
        };
        assert_eq!(bulk, "abc");
        assert_eq!(bulk.as_ptr(), frame[4..].as_ptr());
    }
}
