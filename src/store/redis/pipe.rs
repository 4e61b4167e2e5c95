//! The Redis store's own connection to a single node: RESP2 over one TCP connection that every
//! request shares, commands pipelined, with no task of its own.
//!
//! Why not the `redis` crate's `MultiplexedConnection` (which the store still uses for a
//! cluster, Sentinel, TLS, Unix sockets and RESP3): it hands every command to a task of its own
//! through a channel and each reply back through another, and parses with a general combinator
//! parser; callgrind puts that at about 9,000 instructions per command on the application's
//! core. And why not one connection per request (tried, see `BENCHMARKS.md`): with
//! many requests at once, Redis then reads one command per socket read and the application
//! makes one `write` and one `read` per command, which costs more than those instructions save
//! when Redis shares the application's cores.
//!
//! Here a request appends its command to the connection's output buffer, and whichever request
//! polls next writes what is buffered (one `write` for every command queued since) and reads
//! what has arrived (one `read` for every reply Redis has sent), handing each reply to the
//! request it belongs to. Replies come back in the order the commands were written, so each
//! request has a slot in a queue, by sequence number. A request that finds other commands
//! already waiting for replies, or comes right after a read that handed out several replies,
//! yields once before writing, so that the requests the runtime is about to poll can add theirs
//! to the same write; a request alone writes at once.
//!
//! The command timeout is one watchdog timer per connection, set for the earliest deadline of
//! the requests waiting on it: when it fires, those past their deadline fail (their replies are
//! dropped when they come) and it is set for the next. No timer per command.
//!
//! The socket is read and written with non-blocking calls made while holding the connection's
//! lock (never across an `.await`): the lock is what keeps commands, their slots and their
//! replies in one order. A request that stops waiting (its timeout, its client gone) leaves its
//! slot behind, so the replies after it still find their owners; a request that returns or is
//! dropped wakes another waiting one, so someone is always registered for the socket while
//! replies are due. Anything out of step (a reply nobody waits for, bytes that are not RESP2)
//! or a broken socket fails every waiting request and retires the connection; the next request
//! opens a new one.

use std::collections::VecDeque;
use std::fmt;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::OnceCell;
use tokio::time::Sleep;

use super::protocol::{Arg, Command, Head, Reply, SendError, Sent, ServerError};
use super::resp::{self, Parsed};
use crate::key::KEY_HEX_LEN;

/// Room made in the read buffer before a read.
const READ_BUF: usize = 16 << 10;

/// A connection's output buffer is given back its memory once empty, if it grew past this.
const KEEP_OUT: usize = 64 << 10;

/// The one shared connection to a Redis node, opened on first use and again after it broke.
pub(crate) struct Pipe {
    host: String,
    port: u16,
    /// `AUTH` and `SELECT`, as sent on every new connection, and how many replies they get.
    setup: Vec<u8>,
    setup_replies: usize,
    connect_timeout: Duration,
    /// The connection in use, once made: one request connects, those arriving meanwhile wait
    /// for it (no storm of connections after a restart); a retired one is replaced by an empty
    /// cell.
    current: Mutex<Arc<OnceCell<Arc<Line>>>>,
}

/// One connection and the commands in flight on it.
struct Line {
    stream: TcpStream,
    state: Mutex<State>,
    /// Set once it broke (also in `State::broken`; here without the lock).
    retired: AtomicBool,
}

#[derive(Default)]
struct State {
    /// Commands not written yet: `out[written..]`.
    out: Vec<u8>,
    written: usize,
    /// Bytes written on this connection so far, and how many of `out` that counts.
    sent_total: u64,
    /// Replies read, not parsed whole yet.
    input: BytesMut,
    /// One slot per reply not taken yet, in order: `slots[0]` is reply number `first`, and
    /// reply number `next` is the next to arrive.
    slots: VecDeque<Slot>,
    first: u64,
    next: u64,
    /// The request last registered for the socket's readiness to read, and to write (only the
    /// last one registered is woken): by the number of its first reply.
    reader: Option<u64>,
    writer: Option<u64>,
    /// A request will write the buffered commands once it has yielded.
    flush_due: bool,
    /// The last read handed out several replies: their requests are about to send more, so
    /// the next command waits for theirs even if none is in flight.
    busy: bool,
    /// Why the connection is no longer used, once it is not.
    broken: Option<Broken>,
    /// One timer for every deadline on the connection, set for the earliest it knows of: when
    /// it fires, the requests past theirs fail and it is set for the next (no timer per
    /// command).
    watchdog: Option<(Pin<Box<Sleep>>, Instant)>,
}

/// A reply's place in the order.
enum Slot {
    /// Not arrived; on a request's last slot, the waker of the request (replies arrive in
    /// order, so the last one completes it) and its deadline.
    Due(Option<Waker>, Option<Instant>),
    /// Its request's deadline passed before it arrived (the request fails when it looks);
    /// whether it has arrived since (it is dropped).
    Expired { arrived: bool },
    /// Not arrived, and its request is gone: dropped when it arrives.
    Abandoned,
    /// Arrived, not taken yet.
    Arrived(Result<Reply, ServerError>),
    /// Arrived and taken, or dropped.
    Done,
}

/// Why a connection was retired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Broken {
    /// The socket failed or Redis closed it.
    Io(io::ErrorKind),
    /// Redis sent bytes that are not a reply, or one reply too many.
    OutOfStep(&'static str),
}

impl fmt::Display for Broken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Broken::Io(io::ErrorKind::UnexpectedEof) => {
                f.write_str("redis closed the connection before its reply")
            }
            Broken::Io(kind) => write!(f, "the connection to redis failed: {kind}"),
            Broken::OutOfStep(what) => write!(f, "the connection to redis is out of step: {what}"),
        }
    }
}

impl std::error::Error for Broken {}

/// Why a connection's setup failed (`Debug` says it in words too).
struct SetupRefused(ServerError);

impl fmt::Debug for SetupRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SetupRefused({self})")
    }
}

impl fmt::Display for SetupRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "redis refused the connection's setup (authentication failed, or no such \
             database): {}",
            self.0
        )
    }
}

impl std::error::Error for SetupRefused {}

impl Pipe {
    /// A connection to `host:port`, authenticated (`AUTH [username] password`) and on database
    /// `db` if these are given; opened by the first command.
    pub(crate) fn new(
        host: String,
        port: u16,
        username: Option<&str>,
        password: Option<&str>,
        db: i64,
        connect_timeout: Duration,
    ) -> Pipe {
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
        Pipe {
            host,
            port,
            setup,
            setup_replies,
            connect_timeout,
            current: Mutex::default(),
        }
    }

    /// Sends `cmd` (and `then` right after it, on the same connection) and waits for their
    /// replies.
    pub(crate) async fn send(
        &self,
        cmd: &Command<'_>,
        then: Option<&Command<'_>>,
        deadline: Instant,
    ) -> Result<Sent, SendError> {
        let line = self.line(deadline).await?;
        let mut waiting = line.queue(cmd, then, deadline);
        if waiting.flusher {
            // Others' commands are in flight: let the requests the runtime polls next queue
            // theirs, then write them all at once.
            tokio::task::yield_now().await;
            waiting.flush_now();
        }
        let (reply, then_reply) = match poll_fn(|cx| waiting.poll_replies(cx)).await {
            Ok(replies) => replies,
            Err(e) => {
                // A broken connection is replaced; one that only kept a request past its
                // deadline serves on.
                if !line.is_open() {
                    self.retire(&line);
                }
                return Err(e);
            }
        };
        Ok(Sent {
            reply: reply.map_err(SendError::from)?,
            then: then_reply.and_then(Result::ok),
        })
    }

    /// The connection in use, or a new one (by `deadline`).
    async fn line(&self, deadline: Instant) -> Result<Arc<Line>, SendError> {
        loop {
            let cell = {
                let current = lock(&self.current);
                match current.get() {
                    Some(line) if line.is_open() => return Ok(Arc::clone(line)),
                    _ => Arc::clone(&current),
                }
            };
            if let Some(broken) = cell.get() {
                self.retire(broken);
                continue;
            }
            let connected = cell.get_or_try_init(|| async { self.connect().await.map(Arc::new) });
            let line = tokio::time::timeout_at(deadline.into(), connected)
                .await
                .map_err(|_| SendError::TimedOut)??;
            return Ok(Arc::clone(line));
        }
    }

    /// Stops giving out `line`, which broke: the next command connects again.
    fn retire(&self, line: &Arc<Line>) {
        line.retired.store(true, Ordering::Relaxed);
        let mut current = lock(&self.current);
        if current.get().is_some_and(|l| Arc::ptr_eq(l, line)) {
            *current = Arc::default();
        }
    }

    /// A new connection, set up. A failure means no command was sent.
    async fn connect(&self) -> Result<Line, SendError> {
        let not_sent = |e: io::Error| SendError::NotSent(Box::new(e));
        let connect = TcpStream::connect((self.host.as_str(), self.port));
        let mut stream = tokio::time::timeout(self.connect_timeout, connect)
            .await
            .map_err(|_| {
                not_sent(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "no connection to {}:{} within {:?}",
                        self.host, self.port, self.connect_timeout
                    ),
                ))
            })?
            .map_err(not_sent)?;
        // Commands are small and answered at once: no waiting for more to fill a packet.
        stream.set_nodelay(true).map_err(not_sent)?;
        let mut input = BytesMut::with_capacity(READ_BUF);
        if self.setup_replies > 0 {
            stream.write_all(&self.setup).await.map_err(not_sent)?;
            let mut replies = 0;
            while replies < self.setup_replies {
                match resp::parse(&input) {
                    Ok(Some((parsed, len))) => {
                        let _ = input.split_to(len);
                        replies += 1;
                        if let Parsed::Error(e) = parsed {
                            return Err(SendError::Other(Box::new(SetupRefused(e))));
                        }
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => return Err(SendError::NotSent(Box::new(e))),
                }
                if stream.read_buf(&mut input).await.map_err(not_sent)? == 0 {
                    return Err(not_sent(io::ErrorKind::UnexpectedEof.into()));
                }
            }
        }
        Ok(Line {
            stream,
            state: Mutex::new(State {
                input,
                ..State::default()
            }),
            retired: AtomicBool::new(false),
        })
    }
}

impl Line {
    fn is_open(&self) -> bool {
        !self.retired.load(Ordering::Relaxed)
    }

    /// Appends `cmd` (and `then`) to the commands to write, with a slot for each reply.
    fn queue<'a>(
        self: &'a Arc<Self>,
        cmd: &Command<'_>,
        then: Option<&Command<'_>>,
        deadline: Instant,
    ) -> Waiting<'a> {
        let mut state = lock(&self.state);
        let start = state.sent_total + (state.out.len() - state.written) as u64;
        encode(&mut state.out, cmd);
        let mut count = 1;
        if let Some(then) = then {
            encode(&mut state.out, then);
            count = 2;
        }
        let in_flight = !state.slots.is_empty();
        let seq = state.first + state.slots.len() as u64;
        if count == 2 {
            state.slots.push_back(Slot::Due(None, None));
        }
        state.slots.push_back(Slot::Due(None, Some(deadline)));
        let flusher = (in_flight || state.busy) && !state.flush_due;
        if flusher {
            state.flush_due = true;
            state.busy = false;
        }
        Waiting {
            line: self,
            seq,
            count,
            deadline,
            start,
            flusher,
            finished: false,
        }
    }
}

/// A request's place on a connection: its slots, until it has taken its replies or is dropped.
struct Waiting<'a> {
    line: &'a Arc<Line>,
    /// Its first reply's number, and how many (1, or 2 with a following command).
    seq: u64,
    count: usize,
    deadline: Instant,
    /// Where its command starts among the bytes written on the connection.
    start: u64,
    /// It holds back the buffered commands until it has yielded.
    flusher: bool,
    finished: bool,
}

/// The replies of a request: its command's and, if it sent one, its following command's.
type Replies = (
    Result<Reply, ServerError>,
    Option<Result<Reply, ServerError>>,
);

impl Waiting<'_> {
    /// Lets the buffered commands be written (by the next poll).
    fn flush_now(&mut self) {
        if std::mem::take(&mut self.flusher) {
            lock(&self.line.state).flush_due = false;
        }
    }

    /// Writes what is buffered, reads what has arrived, and returns this request's replies once
    /// they are all there.
    fn poll_replies(&mut self, cx: &mut Context<'_>) -> Poll<Result<Replies, SendError>> {
        let line = self.line;
        let mut state = lock(&line.state);
        loop {
            if let Some(replies) = state.take(self.seq, self.count) {
                self.finished = true;
                state.leave(self.seq);
                if state.broken.is_some() {
                    // Its replies came before the connection broke; no new command goes on it.
                    line.retired.store(true, Ordering::Relaxed);
                }
                return Poll::Ready(Ok(replies));
            }
            if state.expired(self.seq + self.count as u64 - 1) {
                self.finished = true;
                state.forget(self.seq, self.count);
                state.leave(self.seq);
                return Poll::Ready(Err(SendError::TimedOut));
            }
            if let Some(broken) = state.broken {
                self.finished = true;
                line.retired.store(true, Ordering::Relaxed);
                state.forget(self.seq, self.count);
                state.leave(self.seq);
                let cause = Box::new(broken);
                // Not one byte of it went out: sending it again is a first attempt.
                return Poll::Ready(Err(if state.sent_total <= self.start {
                    SendError::NotSent(cause)
                } else {
                    SendError::Broken(cause)
                }));
            }
            if !state.flush_due && state.written < state.out.len() {
                match line.stream.try_write(&state.out[state.written..]) {
                    Ok(n) => {
                        state.wrote(n);
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        match line.stream.poll_write_ready(cx) {
                            Poll::Ready(Ok(())) => continue,
                            Poll::Ready(Err(e)) => {
                                state.fail(Broken::Io(e.kind()));
                                continue;
                            }
                            // Registered for the socket's room; read meanwhile.
                            Poll::Pending => state.writer = Some(self.seq),
                        }
                    }
                    Err(e) => {
                        state.fail(Broken::Io(e.kind()));
                        continue;
                    }
                }
            }
            state.input.reserve(READ_BUF);
            match line.stream.try_read_buf(&mut state.input) {
                Ok(0) => state.fail(Broken::Io(io::ErrorKind::UnexpectedEof)),
                Ok(_) => state.deliver(),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    match line.stream.poll_read_ready(cx) {
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(e)) => state.fail(Broken::Io(e.kind())),
                        Poll::Pending => {
                            // Registered (even if the watchdog has it go round again): from
                            // now on it hands over when it leaves.
                            state.reader = Some(self.seq);
                            if state.watch(self.deadline, cx) {
                                continue;
                            }
                            state.wait_in(self.seq + self.count as u64 - 1, cx.waker());
                            return Poll::Pending;
                        }
                    }
                }
                Err(e) => state.fail(Broken::Io(e.kind())),
            }
        }
    }
}

impl Drop for Waiting<'_> {
    /// A request that stops waiting leaves its slots to be skipped (its command, if not
    /// written yet, still goes out with the others) and passes the socket on to another
    /// waiting request if it held it; one that was to write the buffered commands wakes
    /// another to write them.
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut state = lock(&self.line.state);
        state.forget(self.seq, self.count);
        if self.flusher {
            state.flush_due = false;
            state.hand_over();
        }
        state.leave(self.seq);
    }
}

impl State {
    /// The replies numbered `seq..seq + count` (one or two), once all have arrived (their
    /// slots are then done).
    fn take(&mut self, seq: u64, count: usize) -> Option<Replies> {
        fn arrived(slot: &mut Slot) -> Option<Result<Reply, ServerError>> {
            match std::mem::replace(slot, Slot::Done) {
                Slot::Arrived(reply) => Some(reply),
                other => {
                    *slot = other;
                    None
                }
            }
        }
        let at = usize::try_from(seq.checked_sub(self.first)?).ok()?;
        let mut mine = self.slots.iter().skip(at).take(count);
        if mine.len() < count || !mine.all(|s| matches!(s, Slot::Arrived(_))) {
            return None;
        }
        let reply = arrived(self.slots.get_mut(at)?)?;
        let then = match count {
            2 => Some(arrived(self.slots.get_mut(at + 1)?)?),
            _ => None,
        };
        self.pop_done();
        Some((reply, then))
    }

    /// Gives up the slots `seq..seq + count`: a reply that arrived is dropped, one still due
    /// will be.
    fn forget(&mut self, seq: u64, count: usize) {
        let Some(at) = seq
            .checked_sub(self.first)
            .and_then(|at| usize::try_from(at).ok())
        else {
            return;
        };
        for slot in self.slots.iter_mut().skip(at).take(count) {
            *slot = match slot {
                Slot::Due(..) | Slot::Abandoned | Slot::Expired { arrived: false } => {
                    Slot::Abandoned
                }
                Slot::Arrived(_) | Slot::Done | Slot::Expired { arrived: true } => Slot::Done,
            };
        }
        self.pop_done();
    }

    fn pop_done(&mut self) {
        while matches!(self.slots.front(), Some(Slot::Done)) {
            self.slots.pop_front();
            self.first += 1;
        }
    }

    /// Records the waker of the request whose last reply is `seq`.
    fn wait_in(&mut self, seq: u64, waker: &Waker) {
        let Some(at) = seq
            .checked_sub(self.first)
            .and_then(|at| usize::try_from(at).ok())
        else {
            return;
        };
        if let Some(Slot::Due(slot, _)) = self.slots.get_mut(at) {
            match slot {
                Some(w) if w.will_wake(waker) => {}
                _ => *slot = Some(waker.clone()),
            }
        }
    }

    /// The request whose first reply is `seq` stops polling: if it was the one registered
    /// for the socket, or no one is, another waiting request is woken to register in its
    /// place.
    ///
    /// "Or no one is": the request woken to take over has not registered yet when it is
    /// polled, and may finish without registering: its read returned its whole reply without
    /// blocking, or its reply had come before it got to write. Handing over only from the one
    /// registered then left the socket's readiness (and the watchdog) with the waker of a
    /// request that had returned, and every other request waiting until its client gave up.
    /// Requests polled by one task through `FuturesUnordered`, each with a waker of its own and
    /// polled only when woken, made it happen every time with replies of tens of kilobytes
    /// (one read, one reply), and a task each often; `join_all` of a few, all polled on any
    /// wake, hid it.
    fn leave(&mut self, seq: u64) {
        for registered in [&mut self.reader, &mut self.writer] {
            if *registered == Some(seq) {
                *registered = None;
            }
        }
        let unwritten = !self.flush_due && self.written < self.out.len();
        if self.reader.is_none() || self.writer.is_none() && unwritten {
            self.hand_over();
        }
    }

    /// Wakes a waiting request.
    fn hand_over(&mut self) {
        let next = self.slots.iter_mut().find_map(|s| match s {
            Slot::Due(Some(w), _) => Some(w),
            _ => None,
        });
        if let Some(waker) = next {
            waker.wake_by_ref();
        }
    }

    /// Whether the reply numbered `seq` expired.
    fn expired(&self, seq: u64) -> bool {
        seq.checked_sub(self.first)
            .and_then(|at| usize::try_from(at).ok())
            .and_then(|at| self.slots.get(at))
            .is_some_and(|slot| matches!(slot, Slot::Expired { .. }))
    }

    /// Makes sure the watchdog fires by `deadline`, and polls it: `true` when it fired (the
    /// requests past their deadlines are then expired and woken, and it is set again).
    fn watch(&mut self, deadline: Instant, cx: &mut Context<'_>) -> bool {
        match &mut self.watchdog {
            Some((timer, at)) if deadline < *at => {
                timer.as_mut().reset(deadline.into());
                *at = deadline;
            }
            Some(_) => {}
            None => {
                self.watchdog = Some((
                    Box::pin(tokio::time::sleep_until(deadline.into())),
                    deadline,
                ));
            }
        }
        let Some((timer, _)) = &mut self.watchdog else {
            return false;
        };
        if timer.as_mut().poll(cx).is_pending() {
            return false;
        }
        self.expire(Instant::now());
        true
    }

    /// Fails the requests whose deadline has passed, and sets the watchdog for the next one.
    fn expire(&mut self, now: Instant) {
        let mut next: Option<Instant> = None;
        for slot in &mut self.slots {
            if let Slot::Due(waker, Some(deadline)) = slot {
                if *deadline <= now {
                    if let Some(waker) = waker.take() {
                        waker.wake();
                    }
                    *slot = Slot::Expired { arrived: false };
                } else {
                    next = Some(next.map_or(*deadline, |n| n.min(*deadline)));
                }
            }
        }
        match (next, &mut self.watchdog) {
            (Some(at), Some((timer, armed))) => {
                timer.as_mut().reset(at.into());
                *armed = at;
            }
            _ => self.watchdog = None,
        }
    }

    fn wrote(&mut self, n: usize) {
        self.written += n;
        self.sent_total += n as u64;
        if self.written == self.out.len() {
            self.out.clear();
            self.written = 0;
            if self.out.capacity() > KEEP_OUT {
                self.out = Vec::new();
            }
        }
    }

    /// Hands every whole reply read to its slot, waking its request.
    fn deliver(&mut self) {
        let mut delivered = 0;
        loop {
            let (parsed, len) = match resp::parse(&self.input) {
                Ok(Some(whole)) => whole,
                Ok(None) => {
                    self.busy |= delivered > 1;
                    return;
                }
                Err(_) => return self.fail(Broken::OutOfStep("not a RESP2 reply")),
            };
            let frame = self.input.split_to(len).freeze();
            let slot = usize::try_from(self.next - self.first)
                .ok()
                .and_then(|at| self.slots.get_mut(at));
            match slot {
                Some(slot @ Slot::Abandoned) => *slot = Slot::Done,
                Some(Slot::Expired { arrived }) => *arrived = true,
                Some(slot @ Slot::Due(..)) => {
                    let reply = reply(parsed, &frame);
                    if let Slot::Due(Some(waker), _) = std::mem::replace(slot, Slot::Arrived(reply))
                    {
                        waker.wake();
                    }
                }
                _ => return self.fail(Broken::OutOfStep("a reply to no command")),
            }
            self.next += 1;
            delivered += 1;
            self.pop_done();
        }
    }

    /// Retires the connection: every waiting request is woken to fail.
    fn fail(&mut self, why: Broken) {
        if self.broken.is_none() {
            self.broken = Some(why);
        }
        for slot in &mut self.slots {
            if let Slot::Due(Some(waker), _) = slot {
                waker.wake_by_ref();
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
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
            Arg::Key(key) => {
                let mut hex = [0; KEY_HEX_LEN];
                key.encode(&mut hex);
                bulk(out, &hex);
            }
            Arg::Name(name) => {
                bulk_header(out, name.len());
                name.write(out);
                out.extend_from_slice(b"\r\n");
            }
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

    /// A real `redis-server` on a free loopback port, killed when dropped.
    struct Redis(std::process::Child, u16);

    impl Redis {
        async fn start() -> Redis {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let child = std::process::Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no"])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("redis-server (Debian package redis-server) is needed");
            let redis = Redis(child, port);
            for _ in 0..100 {
                if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                    return redis;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("redis-server did not start");
        }
    }

    impl Drop for Redis {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// A request that was to write the commands queued behind it (it yields first) and is
    /// dropped while it yields leaves them to another waiting request, which writes them: the
    /// one queued behind it is answered, not left waiting until its deadline.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_writer_passes_the_write_on() {
        let redis = Redis::start().await;
        let pipe = Arc::new(Pipe::new(
            "127.0.0.1".to_owned(),
            redis.1,
            None,
            None,
            0,
            Duration::from_secs(1),
        ));
        let deadline = || Instant::now() + Duration::from_secs(5);
        let get = |key| Command {
            head: Head::Name("GET"),
            key: Some(KeyName { prefix: "t:", key }),
            args: &[],
        };
        let line = pipe.line(deadline()).await.unwrap();
        // A read just handed out several replies: the next command holds the write back.
        lock(&line.state).busy = true;
        let first = get(Key::random());
        let mut writer = Box::pin(pipe.send(&first, None, deadline()));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(writer.as_mut().poll(&mut cx).is_pending());
        assert!(
            lock(&line.state).flush_due,
            "the first command did not hold the write"
        );
        let behind = tokio::spawn({
            let pipe = Arc::clone(&pipe);
            async move { pipe.send(&get(Key::random()), None, deadline()).await }
        });
        // Let it queue behind the held write and wait for its reply.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !behind.is_finished(),
            "it was written although the write was held"
        );
        drop(writer);
        let sent = tokio::time::timeout(Duration::from_secs(2), behind)
            .await
            .expect("the command queued behind a dropped writer was never written")
            .unwrap()
            .unwrap();
        assert_eq!(sent.reply, Reply::Nil);
    }

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let key = Key::random();
        let header = Header::new(2, 5, 1, 2, None);
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
