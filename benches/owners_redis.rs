//! Owner listing on Redis (issue #16): the time of `owned(owner)` for an owner with 1,000
//! sessions among 1,000,000, on a single `redis-server` and (with `--cluster`) a 3-master Redis
//! Cluster, both started here on free loopback ports.
//!
//! ```text
//! cargo bench --bench owners_redis --features redis                 # single node
//! cargo bench --bench owners_redis --features redis -- --cluster    # and a cluster
//! OWNERS_TOTAL=100000 cargo bench --bench owners_redis --features redis
//! ```
//!
//! The sessions are written through the store's own `create` (256 at a time), so they carry the
//! store's real values and owner indexes: the owner's 1,000 among sessions owned by 333,333
//! other owners (3 each). Prints the fill time, Redis's memory, and the median, fastest and
//! slowest of 20 listings. Needs `redis-server` and `redis-cli` on the `PATH`. (The memory,
//! `SQLite` and PostgreSQL stores' owner listing is measured by `benches/owners.rs`.)

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use hyper_sessions::store::{Key, Record, SessionStore};
use hyper_sessions::{Id, RedisStore};

const LISTINGS: usize = 20;
const WRITERS: usize = 256;
const OTHER_OWNERS: usize = 333_333;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A `redis-server` child process, killed on drop.
struct Server {
    child: Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn start_server(cluster: bool) -> Server {
    let port = free_port();
    let dir = std::env::temp_dir().join(format!("owners-redis-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if cluster {
        cmd.args(["--cluster-enabled", "yes", "--cluster-node-timeout", "5000"]);
    }
    let child = cmd.spawn().expect("redis-server on the PATH");
    let server = Server { child, port, dir };
    let started = Instant::now();
    while cli(port, &["ping"]).trim() != "PONG" {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "redis-server did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    server
}

fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli on the PATH");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Three masters joined into a cluster, every slot served.
fn start_cluster() -> Vec<Server> {
    let nodes: Vec<Server> = (0..3).map(|_| start_server(true)).collect();
    let addrs: Vec<String> = nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    let status = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .stdout(Stdio::null())
        .status()
        .expect("redis-cli on the PATH");
    assert!(status.success(), "redis-cli --cluster create failed");
    let started = Instant::now();
    while !nodes
        .iter()
        .all(|n| cli(n.port, &["cluster", "info"]).contains("cluster_state:ok"))
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "cluster not ok"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    nodes
}

fn used_memory(ports: &[u16]) -> String {
    let bytes: u64 = ports
        .iter()
        .map(|&p| {
            cli(p, &["info", "memory"])
                .lines()
                .find_map(|l| l.strip_prefix("used_memory:"))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum();
    format!("{} MiB", bytes >> 20)
}

/// Fills `store` with `total` sessions, every `total / mine`-th one owned by `me`.
async fn fill(store: &RedisStore, total: usize, mine: usize, me: &Arc<str>) {
    let every = (total / mine.max(1)).max(1);
    let expires = SystemTime::now() + Duration::from_secs(3600);
    let data = Bytes::from_static(br#"{"d":{"user":"someone","count":12},"c":1764590400000}"#);
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..WRITERS {
        let (store, me, data) = (store.clone(), me.clone(), data.clone());
        writers.spawn(async move {
            for i in (w..total).step_by(WRITERS) {
                let owner: Arc<str> = if i % every == 0 && i / every < mine {
                    me.clone()
                } else {
                    format!("user-{}", i % OTHER_OWNERS).into()
                };
                let record = Record::new(Key::of(Id::random()), data.clone(), 1, expires)
                    .with_owner(Some(owner));
                store.create(&record).await.expect("create");
            }
        });
    }
    while let Some(done) = writers.join_next().await {
        done.expect("a writer");
    }
}

async fn measure(what: &str, store: RedisStore, ports: &[u16]) {
    let total = env("OWNERS_TOTAL", 1_000_000);
    let mine = env("OWNERS_MINE", 1_000);
    let me: Arc<str> = "bench-owner@example.com".into();
    let started = Instant::now();
    fill(&store, total, mine, &me).await;
    println!(
        "{what}: filled {total} sessions ({mine} of the owner's) in {:.1} s; Redis memory {}",
        started.elapsed().as_secs_f64(),
        used_memory(ports)
    );
    let mut times = Vec::with_capacity(LISTINGS);
    for _ in 0..LISTINGS {
        let t = Instant::now();
        let listed = store.owned(&me).await.expect("owned");
        times.push(t.elapsed());
        assert_eq!(listed.len(), mine, "the owner's sessions, listed");
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{what}: owned() of {mine} among {total}: median {:.2} ms (fastest {:.2}, slowest {:.2}) over {LISTINGS} listings",
        ms(times[LISTINGS / 2]),
        ms(times[0]),
        ms(times[LISTINGS - 1])
    );
}

fn main() {
    let cluster = std::env::args().any(|a| a == "--cluster");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        {
            let server = start_server(false);
            let store = RedisStore::open(format!("redis://127.0.0.1:{}", server.port))
                .await
                .expect("open");
            measure("single node", store, &[server.port]).await;
        }
        if cluster {
            let nodes = start_cluster();
            let urls: Vec<String> = nodes
                .iter()
                .map(|n| format!("redis://127.0.0.1:{}", n.port))
                .collect();
            let store = RedisStore::open_cluster(urls).await.expect("open cluster");
            let ports: Vec<u16> = nodes.iter().map(|n| n.port).collect();
            measure("cluster (3 masters)", store, &ports).await;
        }
    });
}
