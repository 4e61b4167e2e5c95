//! The benchmark server of `shared/bench/SPEC.md`:
//! `bench_server --port PORT --store memory`, or `--store sqlite --db PATH` when built with the
//! `sqlite` feature (`cargo run --release --features sqlite --example bench_server -- ...`).
//!
//! Stores other than those compiled in make it exit with status 2 at once.

#[path = "common/app.rs"]
mod app;

use std::net::SocketAddr;
use std::process::ExitCode;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_sessions::{MemoryStore, SessionLayer};
use hyper_util::rt::TokioIo;

struct Args {
    port: u16,
    store: String,
    #[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
    db: String,
}

fn parse_args() -> Result<Args, String> {
    let mut port = 3000;
    let mut store = "memory".to_owned();
    let mut db = "bench_sessions.db".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--port" => port = value()?.parse().map_err(|e| format!("--port: {e}"))?,
            "--store" => store = value()?,
            "--db" => db = value()?,
            // Flags of stores this build does not have are accepted and ignored.
            _ if flag.starts_with("--") => {
                let _ = value();
            }
            _ => return Err(format!("unexpected argument {flag:?}")),
        }
    }
    Ok(Args { port, store, db })
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
    let layer = match args.store.as_str() {
        // The /login run creates a session per request: room for a long run.
        "memory" => SessionLayer::new(MemoryStore::builder().max_sessions(20_000_000).build()),
        #[cfg(feature = "sqlite")]
        "sqlite" => match hyper_sessions::SqliteStore::open(&args.db).await {
            Ok(store) => SessionLayer::new(store),
            Err(e) => {
                let mut msg = e.to_string();
                let mut next = std::error::Error::source(&e);
                while let Some(cause) = next {
                    msg = format!("{msg}: {cause}");
                    next = cause.source();
                }
                eprintln!("bench_server: {msg}");
                return ExitCode::FAILURE;
            }
        },
        other => {
            eprintln!("bench_server: store {other:?} is not supported by this build");
            return ExitCode::from(2);
        }
    };
    let service = layer.wrap(service_fn(app::handle));
    let addr = SocketAddr::from(([127, 0, 0, 1], args.port));
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("bench_server: cannot listen on {addr}: {e}");
            return ExitCode::FAILURE;
        }
    };
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
