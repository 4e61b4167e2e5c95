//! The benchmark server of `shared/bench/SPEC.md`:
//! `bench_server --port PORT --store memory`, and with `--features redis` also
//! `--store redis [--redis URL]` and `--store redis-cluster [--redis URL-of-any-node]`
//! (default URL `redis://127.0.0.1:6379`; `--min-replicas-ack N` confirms each write on N
//! replicas with `WAIT N 100`), and with `--features webdis`
//! `--store webdis [--webdis URL]` (default `http://127.0.0.1:7379`), and with
//! `--features sqlite` `--store sqlite --db PATH`, and with `--features postgres`
//! `--store postgres [--postgres URL]` (default `postgres://postgres@127.0.0.1:5432/postgres`;
//! table `bench_sessions`, emptied at start).
//!
//! `--stack axum` (with `--features axum`) serves the same paths through an axum `Router` with
//! the `Session` extractor instead of the layer around a hyper `service_fn` (`--stack hyper`, the
//! default): hyper-sessions on axum, as the peers' servers are.
//!
//! Stores and stacks other than those compiled in make it exit with status 2 at once.
//!
//! Besides the contract's `/untouched`, `/read`, `/counter` and `/login` it answers the extras
//! (all `GET`; keys and `v` values percent-decoded; bodies as in SPEC.md; also `/id` and
//! `/remember/{secs}` for the tests, 404 for other paths):
//! `/set/{key}?v={value}` (default `1`), `/get/{key}`, `/keys`, `/incr/{key}`,
//! `/flash/{key}?v={value}`, `/cycle`, `/destroy`, `/remove/{key}` (remove `key`, `ok`),
//! `/clear` (remove every key, `ok`), and `/sleep/{ms}/{path}`: load the session (one store
//! read), wait `ms` milliseconds, then do and answer what `/{path}` does, for any path here
//! (`/sleep/300/cycle`, `/sleep/300/remove/a`, `/sleep/300/set/k?v=x`, ...). The sleep holds a
//! request open between its load and its commit while others on the same session finish, so
//! that a race between any two operations can be driven over HTTP on every store.
//!
//! `--signing-key HEX` (64 hex digits: a 32-byte key; repeatable) signs the session cookies, for
//! every store: the first key signs, all of them verify (`SessionLayerBuilder::signing_keys`).
//!
//! For the scaling runs of `benches/scale.sh`: `--prefill N` creates N sessions in the store
//! before serving, each holding `count` and a string of `--value-bytes B` bytes (default 0),
//! and `--pool-out FILE` writes the cookies of the first 1000 of them, one per line (signed with
//! the first `--signing-key`, if any).

#[path = "common/app.rs"]
mod app;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_sessions::store::{Key, Record, SessionStore};
use hyper_sessions::{Id, MemoryStore, SessionLayer};
use hyper_util::rt::TokioIo;

struct Args {
    port: u16,
    store: String,
    /// `hyper` (the layer around a `service_fn`) or `axum` (a `Router` with the extractor).
    stack: String,
    prefill: usize,
    value_bytes: usize,
    pool_out: Option<String>,
    /// `--signing-key` values, decoded; the first signs.
    signing_keys: Vec<[u8; 32]>,
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    redis: String,
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    min_replicas_ack: usize,
    #[cfg_attr(not(feature = "webdis"), allow(dead_code))]
    webdis: String,
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    db: String,
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    postgres: String,
}

fn parse_args() -> Result<Args, String> {
    let mut port = 3000;
    let mut store = "memory".to_owned();
    let mut stack = "hyper".to_owned();
    let mut redis = "redis://127.0.0.1:6379".to_owned();
    let mut min_replicas_ack = 0;
    let (mut prefill, mut value_bytes, mut pool_out) = (0, 0, None);
    let mut signing_keys = Vec::new();
    let mut webdis = "http://127.0.0.1:7379".to_owned();
    let mut db = "bench_sessions.db".to_owned();
    let mut postgres = "postgres://postgres@127.0.0.1:5432/postgres".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--port" => port = value()?.parse().map_err(|e| format!("--port: {e}"))?,
            "--store" => store = value()?,
            "--stack" => stack = value()?,
            "--redis" => redis = value()?,
            "--min-replicas-ack" => {
                min_replicas_ack = value()?
                    .parse()
                    .map_err(|e| format!("--min-replicas-ack: {e}"))?;
            }
            "--prefill" => prefill = value()?.parse().map_err(|e| format!("--prefill: {e}"))?,
            "--value-bytes" => {
                value_bytes = value()?
                    .parse()
                    .map_err(|e| format!("--value-bytes: {e}"))?;
            }
            "--pool-out" => pool_out = Some(value()?),
            "--signing-key" => signing_keys.push(parse_key(&value()?)?),
            "--webdis" => webdis = value()?,
            "--db" => db = value()?,
            "--postgres" => postgres = value()?,
            // Flags of stores this build does not have are accepted and ignored.
            _ if flag.starts_with("--") => {
                let _ = value();
            }
            _ => return Err(format!("unexpected argument {flag:?}")),
        }
    }
    Ok(Args {
        port,
        store,
        stack,
        prefill,
        value_bytes,
        pool_out,
        signing_keys,
        redis,
        min_replicas_ack,
        webdis,
        db,
        postgres,
    })
}

/// A `--signing-key`: exactly 64 hex digits. The error never repeats the key.
fn parse_key(hex: &str) -> Result<[u8; 32], String> {
    let digits = hex.as_bytes();
    if digits.len() != 64 {
        return Err(format!(
            "--signing-key needs 64 hex digits (32 bytes), got {} characters",
            digits.len()
        ));
    }
    let mut key = [0u8; 32];
    for (byte, pair) in key.iter_mut().zip(digits.chunks_exact(2)) {
        let pair = std::str::from_utf8(pair).ok();
        *byte = pair
            .and_then(|p| u8::from_str_radix(p, 16).ok())
            .ok_or("--signing-key holds a character that is not a hex digit")?;
    }
    Ok(key)
}

/// The `Cookie` pair a client sends for `id`: the bare id, or with signing keys the id signed
/// with the first, as the layer signs it (`<id>.<base64url(first 16 bytes of BLAKE3-keyed(k,
/// "id=<id>"))>`, `k`
/// derived from the key; see `SessionLayerBuilder::signing_keys`). Written here from the
/// documented format, not through the library.
fn cookie_pair(id: Id, signing_keys: &[[u8; 32]]) -> String {
    use base64::Engine as _;

    let Some(key) = signing_keys.first() else {
        return format!("id={id}");
    };
    let mac_key = blake3::derive_key("hyper-sessions 2026-12-01 session cookie MAC key", key);
    let tag = blake3::keyed_hash(&mac_key, format!("id={id}").as_bytes());
    let tag = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&tag.as_bytes()[..16]);
    format!("id={id}.{tag}")
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("bench_server: {e}");
            return ExitCode::from(2);
        }
    };
    match args.store.as_str() {
        // The /login run creates a session per request, and the scaling runs prefill up to a
        // million 64 KiB values: room for both, so that nothing is evicted while measuring.
        "memory" => {
            let store = MemoryStore::builder()
                .max_sessions(20_000_000)
                .max_bytes(128 << 30)
                .build();
            run(store, &args).await
        }
        #[cfg(feature = "redis")]
        "redis" | "redis-cluster" => {
            let builder = hyper_sessions::RedisStore::builder()
                .min_replicas_ack(args.min_replicas_ack, Duration::from_millis(100));
            let store = if args.store == "redis" {
                builder.open(args.redis.as_str()).await
            } else {
                builder.open_cluster([args.redis.as_str()]).await
            };
            match store {
                Ok(store) => run(store, &args).await,
                Err(e) => {
                    eprintln!("bench_server: cannot use Redis at {}: {e:?}", args.redis);
                    ExitCode::FAILURE
                }
            }
        }
        #[cfg(feature = "webdis")]
        "webdis" => match hyper_sessions::WebdisStore::open(&args.webdis).await {
            Ok(store) => run(store, &args).await,
            Err(e) => {
                eprintln!("bench_server: cannot use Webdis at {}: {e:?}", args.webdis);
                ExitCode::FAILURE
            }
        },
        #[cfg(feature = "sqlite")]
        "sqlite" => match hyper_sessions::SqliteStore::open(&args.db).await {
            Ok(store) => run(store, &args).await,
            Err(e) => {
                let mut msg = e.to_string();
                let mut next = std::error::Error::source(&e);
                while let Some(cause) = next {
                    msg = format!("{msg}: {cause}");
                    next = cause.source();
                }
                eprintln!("bench_server: {msg}");
                ExitCode::FAILURE
            }
        },
        #[cfg(feature = "postgres")]
        "postgres" => match open_postgres(&args.postgres).await {
            Ok(store) => run(store, &args).await,
            Err(e) => {
                let mut msg = e.to_string();
                let mut next = std::error::Error::source(&e);
                while let Some(cause) = next {
                    msg = format!("{msg}: {cause}");
                    next = cause.source();
                }
                eprintln!("bench_server: {msg}");
                ExitCode::FAILURE
            }
        },
        other => {
            eprintln!("bench_server: store {other:?} is not supported by this build");
            ExitCode::from(2)
        }
    }
}

/// The PostgreSQL store on table `bench_sessions`, emptied first (each run starts from no
/// sessions, as the other stores' runs do).
#[cfg(feature = "postgres")]
async fn open_postgres(
    url: &str,
) -> Result<hyper_sessions::PostgresStore, hyper_sessions::store::StoreError> {
    let store = hyper_sessions::PostgresStore::builder()
        .table("bench_sessions")
        .open(url)
        .await?;
    let (client, connection) = hyper_sessions::deadpool_postgres::tokio_postgres::connect(
        url,
        hyper_sessions::deadpool_postgres::tokio_postgres::NoTls,
    )
    .await
    .map_err(hyper_sessions::store::StoreError::unavailable)?;
    tokio::spawn(connection);
    client
        .batch_execute("TRUNCATE bench_sessions")
        .await
        .map_err(hyper_sessions::store::StoreError::unavailable)?;
    Ok(store)
}

/// Creates `args.prefill` sessions straight through the store, 64 at a time, and writes the
/// cookies of the first 1000 to `args.pool_out`.
async fn prefill<S: SessionStore + Clone>(store: &S, args: &Args) -> Result<(), String> {
    let payload = Bytes::from(format!(
        r#"{{"d":{{"count":0,"pad":"{}"}}}}"#,
        "x".repeat(args.value_bytes)
    ));
    let expires = SystemTime::now() + Duration::from_secs(24 * 3600);
    let mut pool = Vec::new();
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..args.prefill {
        let id = Id::random();
        if pool.len() < 1000 {
            pool.push(cookie_pair(id, &args.signing_keys));
        }
        let (store, payload) = (store.clone(), payload.clone());
        tasks.spawn(async move {
            store
                .create(&Record::new(Key::of(id), payload, 1, expires))
                .await
                .map_err(|e| format!("prefill: {e:?}"))
        });
        if tasks.len() >= 64 || n + 1 == args.prefill {
            while let Some(done) = tasks.join_next().await {
                done.map_err(|e| e.to_string())??;
            }
        }
    }
    if let Some(path) = &args.pool_out {
        std::fs::write(path, pool.join("\n") + "\n").map_err(|e| format!("{path}: {e}"))?;
    }
    Ok(())
}

async fn run<S: SessionStore + Clone>(store: S, args: &Args) -> ExitCode {
    if let Err(e) = prefill(&store, args).await {
        eprintln!("bench_server: {e}");
        return ExitCode::FAILURE;
    }
    let layer = match SessionLayer::builder(store)
        .signing_keys(&args.signing_keys)
        .build()
    {
        Ok(layer) => layer,
        Err(e) => {
            eprintln!("bench_server: {e}");
            return ExitCode::from(2);
        }
    };
    let addr = SocketAddr::from(([127, 0, 0, 1], args.port));
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("bench_server: cannot listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
    match args.stack.as_str() {
        "hyper" => serve_hyper(listener, &layer).await,
        #[cfg(feature = "axum")]
        "axum" => {
            let served = axum::serve(listener, app::axum_router(&layer)).await;
            eprintln!("bench_server: axum::serve ended: {served:?}");
            ExitCode::FAILURE
        }
        other => {
            eprintln!("bench_server: stack {other:?} is not compiled in");
            ExitCode::from(2)
        }
    }
}

/// The layer around the app's `service_fn`, one hyper HTTP/1 connection per socket.
async fn serve_hyper(listener: tokio::net::TcpListener, layer: &SessionLayer) -> ExitCode {
    let service = layer.wrap(service_fn(app::handle));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = service.clone();
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
