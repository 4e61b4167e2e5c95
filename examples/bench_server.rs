//! The benchmark server of `shared/bench/SPEC.md`:
//! `bench_server --port PORT --store memory`, and with `--features redis` also
//! `--store redis [--redis URL]` and `--store redis-cluster [--redis URL-of-any-node]`
//! (default URL `redis://127.0.0.1:6379`), and with `--features webdis`
//! `--store webdis [--webdis URL]` (default `http://127.0.0.1:7379`).
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
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    redis: String,
    #[cfg_attr(not(feature = "webdis"), allow(dead_code))]
    webdis: String,
}

fn parse_args() -> Result<Args, String> {
    let mut port = 3000;
    let mut store = "memory".to_owned();
    let mut redis = "redis://127.0.0.1:6379".to_owned();
    let mut webdis = "http://127.0.0.1:7379".to_owned();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--port" => port = value()?.parse().map_err(|e| format!("--port: {e}"))?,
            "--store" => store = value()?,
            "--redis" => redis = value()?,
            "--webdis" => webdis = value()?,
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
        redis,
        webdis,
    })
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
        #[cfg(feature = "redis")]
        "redis" | "redis-cluster" => {
            let store = if args.store == "redis" {
                hyper_sessions::RedisStore::open(args.redis.as_str()).await
            } else {
                hyper_sessions::RedisStore::open_cluster([args.redis.as_str()]).await
            };
            match store {
                Ok(store) => SessionLayer::new(store),
                Err(e) => {
                    eprintln!("bench_server: cannot use Redis at {}: {e:?}", args.redis);
                    return ExitCode::FAILURE;
                }
            }
        }
        #[cfg(feature = "webdis")]
        "webdis" => match hyper_sessions::WebdisStore::open(&args.webdis).await {
            Ok(store) => SessionLayer::new(store),
            Err(e) => {
                eprintln!("bench_server: cannot use Webdis at {}: {e:?}", args.webdis);
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
