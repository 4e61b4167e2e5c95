//! Real servers the store tests start for themselves: `redis-server` on a free loopback port
//! (killable and restartable on the same port), a 3-master Redis Cluster (with replicas if
//! asked), Redis Sentinels watching a master, `webdis` in front of
//! a Redis (killable and restartable too), `stunnel4` terminating TLS with a test CA made by
//! `openssl`, PostgreSQL (`initdb` and `postgres`, as an unprivileged user when run as root),
//! the `bench_server` example (built with cargo), a TCP proxy that counts connections, one that
//! loses one reply, and one that garbles replies.
//!
//! Servers are child processes in their own temporary directory; dropping the handle kills the
//! process and removes the directory. A missing binary fails the test with the Debian package to
//! install (`scripts/test.sh` installs it).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// The path of `binary` on `PATH`; panics naming the Debian package that provides it.
pub fn require_binary(binary: &str, debian_package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(binary))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "`{binary}` not found on PATH: install the Debian package `{debian_package}` \
                 (`apt-get install {debian_package}`; scripts/test.sh does this)"
            )
        })
}

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A fresh directory under the system temp dir, removed by [`TempDir`]'s `Drop`.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "hyper-sessions-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `redis-server` child process on `127.0.0.1:port`, without persistence unless asked
/// (`--save "" --appendonly no`, overridable through `extra_args`).
pub struct RedisServer {
    port: u16,
    extra_args: Vec<String>,
    child: Option<Child>,
    dir: TempDir,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers `PING`.
    pub async fn start() -> RedisServer {
        RedisServer::start_with(&[]).await
    }

    /// As [`start`](Self::start), with more `redis-server` arguments (later ones win, so
    /// `["--appendonly", "yes"]` turns persistence on).
    pub async fn start_with(extra_args: &[&str]) -> RedisServer {
        let extra_args: Vec<String> = extra_args.iter().map(|&s| s.to_owned()).collect();
        // Another process may grab the free port before the server binds it: try a few.
        let mut last_error = String::new();
        for _ in 0..5 {
            let mut server = RedisServer {
                port: free_port(),
                extra_args: extra_args.clone(),
                child: None,
                dir: TempDir::new("redis"),
            };
            match server.spawn_and_wait().await {
                Ok(()) => return server,
                Err(e) => last_error = e,
            }
        }
        panic!("redis-server did not start: {last_error}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's working directory (its `redis.log`, `nodes.conf`, append-only files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Whether the process is running.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and in the same directory.
    pub async fn restart(&mut self) {
        self.kill();
        let mut last_error = String::new();
        // The port may sit in TIME_WAIT for a moment; redis sets SO_REUSEADDR, so this is rare.
        for _ in 0..20 {
            match self.spawn_and_wait().await {
                Ok(()) => return,
                Err(e) => last_error = e,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "redis-server did not restart on port {}: {last_error}",
            self.port
        );
    }

    /// Runs `redis-cli -p PORT args...` and returns its standard output.
    pub async fn cli(&self, args: &[&str]) -> String {
        redis_cli(self.port, args).await
    }

    fn args(&self) -> Vec<String> {
        let mut args: Vec<String> = [
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--logfile",
            "redis.log",
        ]
        .iter()
        .map(|&s| s.to_owned())
        .collect();
        args.push("--dir".to_owned());
        args.push(self.dir.path().to_string_lossy().into_owned());
        args.extend(self.extra_args.iter().cloned());
        args
    }

    async fn spawn_and_wait(&mut self) -> Result<(), String> {
        let binary = require_binary("redis-server", "redis-server");
        let child = Command::new(binary)
            .args(self.args())
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot run redis-server: {e}"))?;
        let addr = self.addr();
        let log = self.dir.path().join("redis.log");
        self.child = Some(wait_ready(child, "redis-server", &log, || ping(addr)).await?);
        Ok(())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits up to 10 s for a server just spawned to answer `ready`; reports its log if it exits,
/// and kills it if it never answers.
async fn wait_ready<F, Fut>(
    mut child: std::process::Child,
    name: &str,
    log: &std::path::Path,
    ready: F,
) -> Result<std::process::Child, String>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            return Err(format!("{name} exited with {status}: {log}"));
        }
        if ready().await {
            return Ok(child);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("{name} did not answer within 10 s"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether a Redis server at `addr` answers `PING` with `PONG`.
pub async fn ping(addr: SocketAddr) -> bool {
    let Ok(Ok(mut s)) =
        tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await
    else {
        return false;
    };
    if s.write_all(b"PING\r\n").await.is_err() {
        return false;
    }
    // `+PONG`, or `-NOAUTH ...` from a server with a password: up and answering either way.
    let mut buf = [0u8; 7];
    matches!(
        tokio::time::timeout(Duration::from_millis(500), s.read_exact(&mut buf)).await,
        Ok(Ok(_)) if &buf == b"+PONG\r\n" || buf.starts_with(b"-NOAUTH")
    )
}

/// Runs `redis-cli -p port args...`; panics if it cannot run or fails.
pub async fn redis_cli(port: u16, args: &[&str]) -> String {
    let binary = require_binary("redis-cli", "redis-server");
    let out = tokio::process::Command::new(binary)
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .expect("redis-cli runs");
    assert!(
        out.status.success(),
        "redis-cli {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A Redis Cluster of three masters (no replicas, unless started with
/// [`start_with_replicas`](Self::start_with_replicas)) on free loopback ports.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
    /// Every node's `redis-server` arguments.
    args: Vec<String>,
}

impl RedisCluster {
    /// Starts three `--cluster-enabled` servers, joins them with `redis-cli --cluster create`
    /// and waits until every node reports `cluster_state:ok`.
    pub async fn start() -> RedisCluster {
        RedisCluster::start_with_replicas(0, 5000, &[]).await
    }

    /// Three masters with `replicas` replicas each (`--cluster-replicas`), every node with
    /// `--cluster-node-timeout node_timeout_ms` (a failover starts about that long after a
    /// master stops answering) and `extra_args`; waits until every node reports
    /// `cluster_state:ok` and every replica's link to its master is up.
    pub async fn start_with_replicas(
        replicas: usize,
        node_timeout_ms: u64,
        extra_args: &[&str],
    ) -> RedisCluster {
        let count = 3 * (1 + replicas);
        let node_timeout = node_timeout_ms.to_string();
        let mut args = vec![
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            &node_timeout,
        ];
        args.extend_from_slice(extra_args);
        let mut nodes = Vec::new();
        for _ in 0..count {
            nodes.push(RedisServer::start_with(&args).await);
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let replicas = replicas.to_string();
        let mut create = vec!["--cluster", "create"];
        create.extend(addrs.iter().map(String::as_str));
        create.extend(["--cluster-replicas", &replicas, "--cluster-yes"]);
        nodes[0].cli(&create).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        let known = format!("cluster_known_nodes:{count}");
        for node in &nodes {
            loop {
                let info = node.cli(&["cluster", "info"]).await;
                let replication = node.cli(&["info", "replication"]).await;
                if info.contains("cluster_state:ok")
                    && info.contains(&known)
                    && (replication.contains("role:master")
                        || replication.contains("master_link_status:up"))
                {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "cluster never became ok: {info}{replication}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        RedisCluster {
            nodes,
            args: args.iter().map(|&a| a.to_owned()).collect(),
        }
    }

    /// Starts a new, empty node and joins it to the cluster as a replica of master `master`
    /// (`CLUSTER MEET`, `CLUSTER REPLICATE`), as an operator replaces a lost node;
    /// waits until its link to the master is up. Answers its index.
    pub async fn add_replica(&mut self, master: usize) -> usize {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let node = RedisServer::start_with(&args).await;
        let id = self.nodes[master].cli(&["cluster", "myid"]).await;
        let id = id.trim();
        // `CLUSTER MEET`, then `CLUSTER REPLICATE` once the new node knows the master (what
        // `redis-cli --cluster add-node --cluster-slave` does, without its one-second pauses).
        let port = self.nodes[master].port().to_string();
        node.cli(&["cluster", "meet", "127.0.0.1", &port]).await;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !node.cli(&["cluster", "nodes"]).await.contains(id) {
            assert!(
                Instant::now() < deadline,
                "the new node never met the cluster"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        loop {
            let out = node.cli(&["cluster", "replicate", id]).await;
            if out.trim() == "OK" {
                break;
            }
            assert!(Instant::now() < deadline, "CLUSTER REPLICATE: {out}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let replication = node.cli(&["info", "replication"]).await;
            if replication.contains("master_link_status:up") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the new replica never synced: {replication}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// The index in [`nodes`](Self::nodes) of the master that serves `key` now, as node
    /// `asking` sees the cluster.
    pub async fn master_of(&self, asking: usize, key: &str) -> usize {
        let slot: u16 = self.nodes[asking]
            .cli(&["cluster", "keyslot", key])
            .await
            .trim()
            .parse()
            .unwrap();
        for line in self.nodes[asking].cli(&["cluster", "nodes"]).await.lines() {
            // <id> <ip:port@cport> <flags> <master> <ping> <pong> <epoch> <link> <slot ranges>
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let owns = fields[8..].iter().any(|range| {
                let (lo, hi) = range.split_once('-').unwrap_or((range, range));
                matches!((lo.parse::<u16>(), hi.parse::<u16>()), (Ok(lo), Ok(hi)) if (lo..=hi).contains(&slot))
            });
            if owns {
                return self.index_of(fields[1]);
            }
        }
        panic!("no master serves slot {slot}");
    }

    /// The indexes of the replicas of master `master`, as it sees the cluster.
    pub async fn replicas_of(&self, master: usize) -> Vec<usize> {
        let nodes = self.nodes[master].cli(&["cluster", "nodes"]).await;
        let id = nodes
            .lines()
            .find(|l| l.contains("myself"))
            .and_then(|l| l.split_whitespace().next())
            .unwrap()
            .to_owned();
        nodes
            .lines()
            .filter(|l| l.split_whitespace().nth(3) == Some(id.as_str()))
            .map(|l| self.index_of(l.split_whitespace().nth(1).unwrap()))
            .collect()
    }

    /// The index of the node at `ip:port@cport`.
    fn index_of(&self, addr: &str) -> usize {
        let port: u16 = addr
            .split('@')
            .next()
            .and_then(|a| a.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {addr:?}"));
        self.nodes
            .iter()
            .position(|n| n.port() == port)
            .unwrap_or_else(|| panic!("no node on port {port}"))
    }

    /// Whether node `index` answers `ROLE` as a master.
    pub async fn is_master(&self, index: usize) -> bool {
        self.nodes[index]
            .cli(&["role"])
            .await
            .lines()
            .next()
            .is_some_and(|l| l.trim() == "master")
    }

    /// Every node's URL.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// A cluster shared by the tests of this process that run at the same time: started by the
    /// first that asks, stopped when the last holder drops it (so nothing outlives the tests).
    pub async fn shared() -> Arc<RedisCluster> {
        static SHARED: Mutex<Weak<RedisCluster>> = Mutex::new(Weak::new());
        static STARTING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let _starting = STARTING.lock().await;
        if let Some(cluster) = SHARED.lock().unwrap().upgrade() {
            return cluster;
        }
        let cluster = Arc::new(RedisCluster::start().await);
        *SHARED.lock().unwrap() = Arc::downgrade(&cluster);
        cluster
    }
}

/// A Redis Cluster of one master: a `--cluster-enabled` server that owns all 16384 slots
/// (`CLUSTER ADDSLOTSRANGE 0 16383`), announcing itself as `127.0.0.1`. Waits until the node
/// reports `cluster_state:ok`.
pub async fn one_node_cluster() -> RedisServer {
    let node = RedisServer::start_with(&[
        "--cluster-enabled",
        "yes",
        "--cluster-config-file",
        "nodes.conf",
        "--cluster-announce-ip",
        "127.0.0.1",
    ])
    .await;
    let out = node.cli(&["cluster", "addslotsrange", "0", "16383"]).await;
    assert_eq!(out.trim(), "OK", "CLUSTER ADDSLOTSRANGE: {out}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let info = node.cli(&["cluster", "info"]).await;
        if info.contains("cluster_state:ok") {
            return node;
        }
        assert!(
            Instant::now() < deadline,
            "the one-node cluster never became ok: {info}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Makes a cluster node announce `port` as its own (`cluster-announce-port`), so that cluster
/// clients reach it there (say, through a proxy on that port); waits until `CLUSTER SLOTS`
/// says so.
pub async fn announce_port(node: &RedisServer, port: u16) {
    let port = port.to_string();
    let out = node
        .cli(&["config", "set", "cluster-announce-port", &port])
        .await;
    assert_eq!(out.trim(), "OK", "CONFIG SET cluster-announce-port: {out}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !node
        .cli(&["cluster", "slots"])
        .await
        .lines()
        .any(|l| l.trim() == port)
    {
        assert!(Instant::now() < deadline, "the node never announced {port}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Redis Sentinels (`redis-server CONF --sentinel`, so no package beyond `redis-server`) on free
/// loopback ports, watching one master as `mymaster` with a quorum of two, and quick to act:
/// `down-after-milliseconds 1000`, `failover-timeout 5000`.
pub struct RedisSentinels {
    ports: Vec<u16>,
    children: Vec<Child>,
    /// Their directories (config, log), removed when dropped.
    dirs: Vec<TempDir>,
}

impl RedisSentinels {
    /// The name the Sentinels know the master by.
    pub const MASTER: &'static str = "mymaster";

    /// Starts `count` Sentinels watching `master`, and waits until each knows `replicas`
    /// replicas and every other Sentinel (a failover needs both).
    pub async fn start(master: &RedisServer, count: usize, replicas: usize) -> RedisSentinels {
        let binary = require_binary("redis-server", "redis-server");
        let mut sentinels = RedisSentinels {
            ports: Vec::new(),
            children: Vec::new(),
            dirs: Vec::new(),
        };
        for _ in 0..count {
            let mut last_error = String::new();
            let mut started = false;
            for _ in 0..5 {
                let port = free_port();
                let dir = TempDir::new("sentinel");
                let config = format!(
                    "port {port}\nbind 127.0.0.1\ndaemonize no\nlogfile sentinel.log\n\
                     dir {dir}\nsentinel monitor {name} 127.0.0.1 {master} 2\n\
                     sentinel down-after-milliseconds {name} 1000\n\
                     sentinel failover-timeout {name} 5000\n\
                     sentinel parallel-syncs {name} 1\n",
                    dir = dir.path().display(),
                    name = Self::MASTER,
                    master = master.port(),
                );
                let config_path = dir.path().join("sentinel.conf");
                std::fs::write(&config_path, config).unwrap();
                let child = Command::new(&binary)
                    .arg(&config_path)
                    .arg("--sentinel")
                    .current_dir(dir.path())
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("redis-server --sentinel runs");
                let addr = SocketAddr::from(([127, 0, 0, 1], port));
                let log = dir.path().join("sentinel.log");
                match wait_ready(child, "redis-sentinel", &log, || ping(addr)).await {
                    Ok(child) => {
                        sentinels.ports.push(port);
                        sentinels.children.push(child);
                        sentinels.dirs.push(dir);
                        started = true;
                        break;
                    }
                    Err(e) => last_error = e,
                }
            }
            assert!(started, "a Sentinel did not start: {last_error}");
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for &port in &sentinels.ports {
            loop {
                let info = redis_cli(port, &["sentinel", "master", Self::MASTER]).await;
                let field = |name: &str| -> usize {
                    let mut lines = info.lines();
                    while let Some(l) = lines.next() {
                        if l.trim() == name {
                            return lines
                                .next()
                                .and_then(|v| v.trim().parse().ok())
                                .unwrap_or(0);
                        }
                    }
                    0
                };
                if field("num-slaves") >= replicas && field("num-other-sentinels") + 1 >= count {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the Sentinels never saw each other and the replicas: {info}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        sentinels
    }

    /// Every Sentinel's URL.
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// The port of the master, as the first Sentinel reports it now.
    pub async fn master_port(&self) -> u16 {
        let out = redis_cli(
            self.ports[0],
            &["sentinel", "get-master-addr-by-name", Self::MASTER],
        )
        .await;
        out.lines().nth(1).unwrap().trim().parse().unwrap()
    }
}

impl Drop for RedisSentinels {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A `MONITOR` connection: the commands a Redis server executes, as it executes them.
pub struct Monitor {
    lines: tokio::io::Lines<BufReader<TcpStream>>,
    marks: usize,
    port: u16,
}

/// One command seen by [`Monitor`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// `lua` for a command run by a script, else the client's address.
    pub source: String,
    /// The command name, upper case.
    pub command: String,
    /// The whole line, for messages.
    pub line: String,
}

impl Monitor {
    pub async fn start(server: &RedisServer) -> Monitor {
        let mut stream = TcpStream::connect(server.addr()).await.unwrap();
        stream.write_all(b"MONITOR\r\n").await.unwrap();
        let mut lines = BufReader::new(stream).lines();
        assert_eq!(lines.next_line().await.unwrap().unwrap(), "+OK");
        Monitor {
            lines,
            marks: 0,
            port: server.port(),
        }
    }

    /// The commands executed since the last call (or since `start`): sends a marker command
    /// from another connection and collects everything before it. Commands run by scripts are
    /// included with `source == "lua"`.
    pub async fn take(&mut self) -> Vec<Seen> {
        self.marks += 1;
        let mark = format!("hyper-sessions-mark-{}", self.marks);
        let mut marker = TcpStream::connect(("127.0.0.1", self.port)).await.unwrap();
        marker
            .write_all(format!("ECHO {mark}\r\n").as_bytes())
            .await
            .unwrap();
        let mut reply = vec![0u8; mark.len() + 16];
        let n = marker.read(&mut reply).await.unwrap();
        assert!(n > 0, "no reply to the marker");
        let mut seen = Vec::new();
        loop {
            let line = tokio::time::timeout(Duration::from_secs(5), self.lines.next_line())
                .await
                .expect("MONITOR went quiet")
                .unwrap()
                .expect("MONITOR connection closed");
            // +1700000000.123456 [0 127.0.0.1:5555] "GET" "key"   or   [0 lua] "GET" ...
            let Some((_, rest)) = line.split_once(" [") else {
                continue;
            };
            let Some((source, args)) = rest.split_once("] ") else {
                continue;
            };
            let source = source.split_once(' ').map_or(source, |(_, s)| s).to_owned();
            let command = args
                .split('"')
                .nth(1)
                .unwrap_or_default()
                .to_ascii_uppercase();
            if command == "ECHO" && args.contains(&mark) {
                return seen;
            }
            seen.push(Seen {
                source,
                command,
                line,
            });
        }
    }
}

/// The commands of `seen` that clients sent (those run by scripts left out).
pub fn client_commands(seen: &[Seen]) -> Vec<String> {
    seen.iter()
        .filter(|s| s.source != "lua")
        .map(|s| s.command.clone())
        .collect()
}

/// A `webdis` child process on `127.0.0.1:port` in front of a [`RedisServer`], from a JSON
/// config the test writes (`"daemonize": false`, logging every request path to `webdis.log`).
/// Killable and restartable on the same port.
pub struct WebdisServer {
    port: u16,
    child: Option<Child>,
    dir: TempDir,
    /// How many lines of the log [`take_requests`](Self::take_requests) has read.
    log_read: usize,
}

impl WebdisServer {
    /// Webdis for `redis`, every command allowed but `DEBUG`.
    pub async fn start(redis: &RedisServer) -> WebdisServer {
        WebdisServer::start_with_acl(redis, r#"[{"disabled": ["DEBUG"]}]"#).await
    }

    /// Webdis for `redis` that allows nothing without these HTTP Basic credentials
    /// (`user:password`) and everything with them.
    pub async fn start_with_basic_auth(redis: &RedisServer, credentials: &str) -> WebdisServer {
        let acl = format!(
            r#"[{{"disabled": ["*"]}}, {{"http_basic_auth": "{credentials}", "enabled": ["*"]}}]"#
        );
        WebdisServer::start_with_acl(redis, &acl).await
    }

    /// Webdis for `redis` with this `acl` array (JSON).
    pub async fn start_with_acl(redis: &RedisServer, acl: &str) -> WebdisServer {
        let mut last_error = String::new();
        for _ in 0..5 {
            let mut server = WebdisServer {
                port: free_port(),
                child: None,
                dir: TempDir::new("webdis"),
                log_read: 0,
            };
            let config = format!(
                r#"{{
  "redis_host": "127.0.0.1", "redis_port": {redis_port}, "redis_auth": null,
  "http_host": "127.0.0.1", "http_port": {port}, "threads": 2,
  "daemonize": false, "database": 0, "acl": {acl},
  "verbosity": 5, "logfile": "{log}"
}}"#,
                redis_port = redis.port(),
                port = server.port,
                log = server.dir.path().join("webdis.log").display(),
            );
            std::fs::write(server.config_path(), config).unwrap();
            match server.spawn_and_wait().await {
                Ok(()) => return server,
                Err(e) => last_error = e,
            }
        }
        panic!("webdis did not start: {last_error}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("webdis.json")
    }

    /// The request paths Webdis logged since the last call (or since it started), in order.
    pub fn take_requests(&mut self) -> Vec<String> {
        let log = std::fs::read_to_string(self.dir.path().join("webdis.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let new = lines[self.log_read.min(lines.len())..]
            .iter()
            // `[pid] 26 Nov 20:42:20 0 /SET/k1`
            .filter_map(|l| l.split_whitespace().nth(5))
            .filter(|p| p.starts_with('/'))
            .map(str::to_owned)
            .collect();
        self.log_read = lines.len();
        new
    }

    /// Kills Webdis at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts Webdis again on the same port with the same config.
    pub async fn restart(&mut self) {
        self.kill();
        let mut last_error = String::new();
        for _ in 0..50 {
            match self.spawn_and_wait().await {
                Ok(()) => return,
                Err(e) => last_error = e,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("webdis did not restart on port {}: {last_error}", self.port);
    }

    async fn spawn_and_wait(&mut self) -> Result<(), String> {
        let binary = require_binary("webdis", "webdis");
        let child = Command::new(binary)
            .arg(self.config_path())
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run webdis: {e}"))?;
        let addr = self.addr();
        let log = self.dir.path().join("webdis.log");
        self.child = Some(wait_ready(child, "webdis", &log, || http_answers(addr)).await?);
        Ok(())
    }
}

impl Drop for WebdisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether an HTTP server at `addr` answers `GET /PING` (with any status).
pub async fn http_answers(addr: SocketAddr) -> bool {
    let Ok(Ok(mut s)) =
        tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await
    else {
        return false;
    };
    let req = b"GET /PING HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    if s.write_all(req).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 9];
    matches!(
        tokio::time::timeout(Duration::from_millis(500), s.read_exact(&mut buf)).await,
        Ok(Ok(_)) if &buf == b"HTTP/1.1 "
    )
}

/// `examples/bench_server.rs` as the benchmark runs it: a process of its own on a free
/// loopback port, spoken to over plain HTTP. The example is built once per test binary (see
/// [`bench_server_binary`]).
pub struct BenchServer {
    port: u16,
    child: Option<Child>,
    dir: TempDir,
}

impl BenchServer {
    /// Starts `bench_server --port PORT` with these store arguments (`["--store", "memory"]`)
    /// and waits until `GET /untouched` answers 200, as the benchmark's harness does.
    pub async fn start(store_args: &[&str]) -> BenchServer {
        let binary = tokio::task::spawn_blocking(bench_server_binary)
            .await
            .unwrap();
        // Another process may grab the free port before the server binds it: try a few.
        let mut last_error = String::new();
        for _ in 0..5 {
            let mut server = BenchServer {
                port: free_port(),
                child: None,
                dir: TempDir::new("bench-server"),
            };
            let log = server.dir.path().join("bench_server.log");
            let child = Command::new(binary)
                .arg("--port")
                .arg(server.port.to_string())
                .args(store_args)
                .current_dir(server.dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .expect("bench_server runs");
            let addr = server.addr();
            let ready = || answers_200(addr, "/untouched");
            match wait_ready(child, "bench_server", &log, ready).await {
                Ok(child) => {
                    server.child = Some(child);
                    return server;
                }
                Err(e) => last_error = e,
            }
        }
        panic!("bench_server {store_args:?} did not start: {last_error}");
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

impl Drop for BenchServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The `bench_server` example, built by `cargo build --example bench_server` with this test
/// binary's own features and profile (so that the library built for the tests is reused),
/// plus `memory`, which the example requires. Built once per test binary; panics with cargo's
/// output if the build fails.
pub fn bench_server_binary() -> &'static Path {
    static BINARY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BINARY.get_or_init(|| {
        let mut features = vec!["memory"];
        for (feature, on) in [
            ("tower", cfg!(feature = "tower")),
            ("axum", cfg!(feature = "axum")),
            ("redis", cfg!(feature = "redis")),
            ("webdis", cfg!(feature = "webdis")),
            ("sqlite", cfg!(feature = "sqlite")),
            ("postgres", cfg!(feature = "postgres")),
        ] {
            if on {
                features.push(feature);
            }
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = Command::new(cargo);
        build
            .args(["build", "--example", "bench_server", "--features"])
            .arg(features.join(","))
            .arg("--manifest-path")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
            // JSON on stdout names the executable; diagnostics still go to stderr as text.
            .arg("--message-format=json-render-diagnostics");
        if !cfg!(debug_assertions) {
            build.arg("--release");
        }
        let out = build.stdin(Stdio::null()).output().expect("cargo runs");
        assert!(
            out.status.success(),
            "cargo build --example bench_server failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|msg| msg["reason"] == "compiler-artifact")
            .filter(|msg| msg["target"]["name"] == "bench_server")
            .find_map(|msg| msg["executable"].as_str().map(PathBuf::from))
            .expect("cargo reported the bench_server executable")
    })
}

/// Whether an HTTP server at `addr` answers `GET path` with 200.
pub async fn answers_200(addr: SocketAddr, path: &str) -> bool {
    let Ok(Ok(mut s)) =
        tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await
    else {
        return false;
    };
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 12];
    matches!(
        tokio::time::timeout(Duration::from_millis(500), s.read_exact(&mut buf)).await,
        Ok(Ok(_)) if &buf == b"HTTP/1.1 200"
    )
}

/// A TCP proxy on a free loopback port in front of `target`, counting the connections it
/// accepts (to check that a client keeps its connections alive). Observation only: the bytes
/// pass unchanged.
pub struct CountingProxy {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingProxy {
    pub async fn start(target: SocketAddr) -> CountingProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                count.fetch_add(1, Ordering::SeqCst);
                conns.spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        CountingProxy {
            addr,
            accepted,
            task,
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A test CA and a server certificate it signed for `localhost` and `127.0.0.1`, made with
/// `openssl` into a temporary directory.
pub struct TestCa {
    dir: TempDir,
}

impl TestCa {
    pub fn generate() -> TestCa {
        let openssl = require_binary("openssl", "openssl");
        let dir = TempDir::new("ca");
        let run = |args: &[&str]| {
            let out = Command::new(&openssl)
                .args(args)
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .output()
                .expect("openssl runs");
            assert!(
                out.status.success(),
                "openssl {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut ca = vec!["req", "-x509"];
        ca.extend(ec);
        ca.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=hyper-sessions test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        run(&ca);
        let mut csr = vec!["req"];
        csr.extend(ec);
        csr.extend([
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ]);
        run(&csr);
        std::fs::write(
            dir.path().join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ]);
        TestCa { dir }
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(self.dir.path().join("ca.pem")).unwrap()
    }

    pub fn server_cert(&self) -> PathBuf {
        self.dir.path().join("server.pem")
    }

    pub fn server_key(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }
}

/// `stunnel4` terminating TLS on a free loopback port and forwarding to `target` in plain TCP,
/// with the server certificate of a [`TestCa`].
pub struct TlsTerminator {
    port: u16,
    child: Option<Child>,
    _dir: TempDir,
}

impl TlsTerminator {
    pub async fn start(ca: &TestCa, target: SocketAddr) -> TlsTerminator {
        let binary = require_binary("stunnel4", "stunnel4");
        let mut last_error = String::new();
        for _ in 0..5 {
            let port = free_port();
            let dir = TempDir::new("stunnel");
            let config = format!(
                "foreground = yes\npid =\noutput = {log}\n\n[webdis]\naccept = 127.0.0.1:{port}\n\
                 connect = {target}\ncert = {cert}\nkey = {key}\n",
                log = dir.path().join("stunnel.log").display(),
                cert = ca.server_cert().display(),
                key = ca.server_key().display(),
            );
            let config_path = dir.path().join("stunnel.conf");
            std::fs::write(&config_path, config).unwrap();
            let mut child = Command::new(&binary)
                .arg(&config_path)
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("stunnel4 runs");
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    let log =
                        std::fs::read_to_string(dir.path().join("stunnel.log")).unwrap_or_default();
                    last_error = format!("stunnel4 exited with {status}: {log}");
                    break;
                }
                if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                    return TlsTerminator {
                        port,
                        child: Some(child),
                        _dir: dir,
                    };
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    last_error = String::from("stunnel4 did not listen within 10 s");
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        panic!("stunnel4 did not start: {last_error}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for TlsTerminator {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether a read from the client is the request whose reply a [`ReplyDroppingProxy`] drops.
type Trigger = Box<dyn Fn(&[u8]) -> bool + Send>;

/// What an armed [`ReplyDroppingProxy`] waits for, and how it tells the test.
struct Armed {
    trigger: Trigger,
    caught: tokio::sync::oneshot::Sender<()>,
    release: tokio::sync::oneshot::Receiver<()>,
}

/// A TCP proxy on a free loopback port in front of `target` that relays every connection
/// unchanged, except when armed: the first client request (one read from the client) that
/// the trigger matches is forwarded to the server, the server's reply is read and held back,
/// and once the test [releases](Self::release) it the client's connection is closed without
/// that reply. The command was applied; its reply was lost.
pub struct ReplyDroppingProxy {
    pub addr: SocketAddr,
    armed: Arc<Mutex<Option<Armed>>>,
    caught: Mutex<Option<tokio::sync::oneshot::Receiver<()>>>,
    release: Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    task: tokio::task::JoinHandle<()>,
}

impl ReplyDroppingProxy {
    pub async fn start(target: SocketAddr) -> ReplyDroppingProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let armed: Arc<Mutex<Option<Armed>>> = Arc::default();
        let shared = armed.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                conns.spawn(drop_one_reply(inbound, target, shared.clone()));
            }
        });
        ReplyDroppingProxy {
            addr,
            armed,
            caught: Mutex::new(None),
            release: Mutex::new(None),
            task,
        }
    }

    /// Drops the reply of the next request `trigger` matches (it sees each read from the client
    /// as it arrives: a small request arrives in one).
    pub fn arm(&self, trigger: impl Fn(&[u8]) -> bool + Send + 'static) {
        let (caught_tx, caught_rx) = tokio::sync::oneshot::channel();
        let (release_tx, release_rx) = tokio::sync::oneshot::channel();
        *self.caught.lock().unwrap() = Some(caught_rx);
        *self.release.lock().unwrap() = Some(release_tx);
        *self.armed.lock().unwrap() = Some(Armed {
            trigger: Box::new(trigger),
            caught: caught_tx,
            release: release_rx,
        });
    }

    /// Waits until the server has answered the matched request (its reply held back).
    pub async fn caught(&self) {
        let caught = self.caught.lock().unwrap().take().expect("armed");
        tokio::time::timeout(Duration::from_secs(10), caught)
            .await
            .expect("the armed request never came")
            .expect("the proxy went away");
    }

    /// Closes the held connection, without the reply.
    pub fn release(&self) {
        let release = self.release.lock().unwrap().take().expect("armed");
        let _ = release.send(());
    }

    /// Whether a trigger is still waiting for its request.
    pub fn is_armed(&self) -> bool {
        self.armed.lock().unwrap().is_some()
    }
}

impl Drop for ReplyDroppingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn drop_one_reply(
    mut client: TcpStream,
    target: SocketAddr,
    armed: Arc<Mutex<Option<Armed>>>,
) {
    let Ok(mut server) = TcpStream::connect(target).await else {
        return;
    };
    let (mut client_read, mut client_write) = client.split();
    let (mut server_read, mut server_write) = server.split();
    let mut up = vec![0u8; 64 * 1024];
    let mut down = vec![0u8; 64 * 1024];
    let mut held: Option<Armed> = None;
    loop {
        tokio::select! {
            n = client_read.read(&mut up) => {
                let n = match n {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if held.is_none() {
                    let mut armed = armed.lock().unwrap();
                    if armed.as_ref().is_some_and(|a| (a.trigger)(&up[..n])) {
                        held = armed.take();
                    }
                }
                if server_write.write_all(&up[..n]).await.is_err() {
                    return;
                }
            }
            n = server_read.read(&mut down) => {
                let n = match n {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if let Some(armed) = held.take() {
                    // The matched request's reply: never relayed. Both connections close once
                    // the test says so.
                    let _ = armed.caught.send(());
                    let _ = armed.release.await;
                    return;
                }
                if client_write.write_all(&down[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// A PostgreSQL server from the Debian package `postgresql`: `initdb` into a temporary
/// directory, then `postgres` on a free loopback port and a socket in that directory, without
/// fsync (a killed server keeps every commit, the OS has it; a power cut is not tested). As root
/// (CI), which PostgreSQL refuses to run as, the directory is given to the `postgres` user (the
/// package creates it) and both run as that user through `setpriv`. Killable (an immediate
/// shutdown, as a crash: no checkpoint, crash recovery on the next start) and restartable on the
/// same port with the same data.
pub struct PostgresServer {
    port: u16,
    child: Option<Child>,
    dir: TempDir,
    /// The user the server runs as, when this process is root.
    run_as: Option<&'static str>,
    /// More `postgres` arguments (TLS).
    extra_args: Vec<String>,
}

/// The Debian package that provides PostgreSQL's server binaries.
pub const POSTGRES_PACKAGE: &str = "postgresql";

/// The path of a PostgreSQL server binary (`initdb`, `postgres`): under the newest
/// `/usr/lib/postgresql/<version>/bin` (where Debian puts them, off `PATH`), else on `PATH`;
/// panics naming the Debian package that provides it.
pub fn postgres_binary(name: &str) -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let path = e.path().join("bin").join(name);
            path.is_file().then_some((version, path))
        })
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, path)) => path,
        None => require_binary(name, POSTGRES_PACKAGE),
    }
}

/// Whether this process runs as root.
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

impl PostgresServer {
    /// Initialises a cluster and starts the server on a free port; waits until it accepts a
    /// connection.
    pub async fn start() -> PostgresServer {
        PostgresServer::start_with(None).await
    }

    /// As [`start`](Self::start), with TLS on (`ssl=on`) under `ca`'s server certificate (for
    /// `localhost` and `127.0.0.1`); plain connections are still accepted.
    pub async fn start_with_tls(ca: &TestCa) -> PostgresServer {
        PostgresServer::start_with(Some(ca)).await
    }

    async fn start_with(tls: Option<&TestCa>) -> PostgresServer {
        let run_as = is_root().then_some("postgres");
        let dir = TempDir::new("postgres");
        std::fs::create_dir_all(dir.path().join("sock")).unwrap();
        if let Some(user) = run_as {
            let status = Command::new("chown")
                .arg("-R")
                .arg(format!("{user}:"))
                .arg(dir.path())
                .status()
                .expect("chown runs");
            assert!(
                status.success(),
                "cannot give {} to the `{user}` user (it is created by the Debian package \
                 `{POSTGRES_PACKAGE}`: `apt-get install {POSTGRES_PACKAGE}`)",
                dir.path().display()
            );
        }
        let mut initdb = PostgresServer::command(run_as, &postgres_binary("initdb"));
        let out = initdb
            .arg("-D")
            .arg(dir.path().join("data"))
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-locale",
                "--no-sync",
                "--no-instructions",
            ])
            .stdin(Stdio::null())
            .output()
            .expect("initdb runs");
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut extra_args = Vec::new();
        if let Some(ca) = tls {
            // PostgreSQL wants its key readable by its own user only.
            let (cert, key) = (dir.path().join("server.crt"), dir.path().join("server.key"));
            std::fs::copy(ca.server_cert(), &cert).unwrap();
            std::fs::copy(ca.server_key(), &key).unwrap();
            std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap();
            if let Some(user) = run_as {
                let status = Command::new("chown")
                    .arg(format!("{user}:"))
                    .args([&cert, &key])
                    .status()
                    .expect("chown runs");
                assert!(status.success());
            }
            extra_args = vec![
                "-c".to_owned(),
                "ssl=on".to_owned(),
                "-c".to_owned(),
                format!("ssl_cert_file={}", cert.display()),
                "-c".to_owned(),
                format!("ssl_key_file={}", key.display()),
            ];
        }
        let mut last_error = String::new();
        let mut server = PostgresServer {
            port: 0,
            child: None,
            dir,
            run_as,
            extra_args,
        };
        // Another process may grab the free port before the server binds it: try a few.
        for _ in 0..5 {
            server.port = free_port();
            match server.spawn_and_wait().await {
                Ok(()) => return server,
                Err(e) => last_error = e,
            }
        }
        panic!("postgres did not start: {last_error}");
    }

    /// A server shared by the tests of this process that run at the same time (each test uses
    /// its own table): started by the first that asks, stopped when the last holder drops it.
    pub async fn shared() -> Arc<PostgresServer> {
        static SHARED: Mutex<Weak<PostgresServer>> = Mutex::new(Weak::new());
        static STARTING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
        let _starting = STARTING.lock().await;
        if let Some(server) = SHARED.lock().unwrap().upgrade() {
            return server;
        }
        let server = Arc::new(PostgresServer::start().await);
        *SHARED.lock().unwrap() = Arc::downgrade(&server);
        server
    }

    fn command(run_as: Option<&str>, binary: &Path) -> Command {
        match run_as {
            Some(user) => {
                let mut c = Command::new(require_binary("setpriv", "util-linux"));
                c.arg(format!("--reuid={user}"))
                    .arg(format!("--regid={user}"))
                    .arg("--clear-groups")
                    .arg("--")
                    .arg(binary);
                c
            }
            None => Command::new(binary),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        self.url_for("postgres")
    }

    /// The URL of database `db` on this server.
    pub fn url_for(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// A `key=value` connection string over the server's Unix socket.
    pub fn socket_url(&self) -> String {
        format!(
            "host={} port={} user=postgres dbname=postgres",
            self.dir.path().join("sock").display(),
            self.port
        )
    }

    /// A plain tokio-postgres client on database `db`, for the tests' own SQL.
    #[cfg(feature = "postgres")]
    pub async fn client(&self, db: &str) -> tokio_postgres::Client {
        let (client, connection) =
            tokio_postgres::connect(&self.url_for(db), tokio_postgres::NoTls)
                .await
                .expect("a test connection to PostgreSQL");
        tokio::spawn(connection);
        client
    }

    /// Stops the server at once (an immediate shutdown, `SIGQUIT` to the postmaster: every
    /// backend ends without a checkpoint, as in a crash), and waits until it has.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("sh")
                .args(["-c", &format!("kill -QUIT {}", child.id())])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port with the same data (after [`kill`](Self::kill),
    /// it recovers from its WAL first).
    pub async fn restart(&mut self) {
        self.kill();
        let mut last_error = String::new();
        for _ in 0..20 {
            match self.spawn_and_wait().await {
                Ok(()) => return,
                Err(e) => last_error = e,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "postgres did not restart on port {}: {last_error}",
            self.port
        );
    }

    async fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log_path = self.dir.path().join("postgres.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        let child = PostgresServer::command(self.run_as, &postgres_binary("postgres"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.dir.path().join("sock"))
            .args([
                "-h",
                "127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "max_connections=200",
                "-c",
                "shared_buffers=32MB",
            ])
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot run postgres: {e}"))?;
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        self.child = Some(wait_ready(child, "postgres", &log_path, || postgres_ready(addr)).await?);
        Ok(())
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether a PostgreSQL server at `addr` answers a startup as user `postgres` with an
/// authentication request or `AuthenticationOk` (not with an error such as "the database
/// system is starting up").
pub async fn postgres_ready(addr: SocketAddr) -> bool {
    let Ok(Ok(mut s)) =
        tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await
    else {
        return false;
    };
    // StartupMessage: length, protocol 3.0, user=postgres, database=postgres.
    let params = b"user\0postgres\0database\0postgres\0\0";
    let mut msg = Vec::new();
    msg.extend_from_slice(&u32::try_from(8 + params.len()).unwrap().to_be_bytes());
    msg.extend_from_slice(&0x0003_0000_u32.to_be_bytes());
    msg.extend_from_slice(params);
    if s.write_all(&msg).await.is_err() {
        return false;
    }
    let mut tag = [0u8; 1];
    // `R`: authentication (ok or a request); `E`: an error (starting up, shutting down).
    matches!(
        tokio::time::timeout(Duration::from_millis(500), s.read_exact(&mut tag)).await,
        Ok(Ok(_)) if tag[0] == b'R'
    )
}

/// What a [`GarblingProxy`] does to the server's next bytes.
#[derive(Debug, Clone)]
pub enum Garble {
    /// Sends these instead of the server's next bytes (once).
    ReplaceNext(Vec<u8>),
    /// Sends these after the server's next bytes (once): a reply nobody asked for.
    AppendToNext(Vec<u8>),
    /// Sends these instead of everything the server sends from now on.
    ReplaceAll(Vec<u8>),
}

/// A TCP proxy on a free loopback port in front of `target` that relays every connection
/// unchanged, but changes what the server sends as told ([`Garble`]), and counts connections.
pub struct GarblingProxy {
    pub addr: SocketAddr,
    garble: Arc<Mutex<Option<Garble>>>,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl GarblingProxy {
    pub async fn start(target: SocketAddr) -> GarblingProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let garble: Arc<Mutex<Option<Garble>>> = Arc::default();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (shared, count) = (garble.clone(), accepted.clone());
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    continue;
                };
                count.fetch_add(1, Ordering::SeqCst);
                let garble = shared.clone();
                conns.spawn(async move {
                    let Ok(outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    let (mut client_read, mut client_write) = inbound.into_split();
                    let (mut server_read, mut server_write) = outbound.into_split();
                    let upstream = tokio::io::copy(&mut client_read, &mut server_write);
                    let downstream = async {
                        let mut buf = vec![0; 64 << 10];
                        loop {
                            let n = match server_read.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            let what = {
                                let mut g = garble.lock().unwrap();
                                match g.clone() {
                                    Some(Garble::ReplaceAll(_)) => g.clone(),
                                    _ => g.take(),
                                }
                            };
                            let out = match what {
                                None => buf[..n].to_vec(),
                                Some(Garble::ReplaceNext(b) | Garble::ReplaceAll(b)) => b,
                                Some(Garble::AppendToNext(b)) => [&buf[..n], &b[..]].concat(),
                            };
                            if client_write.write_all(&out).await.is_err() {
                                return;
                            }
                        }
                    };
                    tokio::select! {
                        _ = upstream => {}
                        () = downstream => {}
                    }
                });
            }
        });
        GarblingProxy {
            addr,
            garble,
            accepted,
            task,
        }
    }

    /// Changes the server's next bytes (or all of them) on whichever connection sends next.
    pub fn garble(&self, garble: Option<Garble>) {
        *self.garble.lock().unwrap() = garble;
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for GarblingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// This test binary run again as an app server of its own: the test named `entry` in it is run
/// with the environment variable `env` set to `value` (saying what to serve), and prints
/// `LISTENING <port>` once it serves. Used to kill an app process (SIGKILL) and start it again
/// on the same data. Dropping the handle kills the process.
pub struct AppProcess {
    child: Child,
    pub addr: SocketAddr,
}

impl AppProcess {
    pub fn start(entry: &str, env: &str, value: impl AsRef<std::ffi::OsStr>) -> AppProcess {
        use std::io::{BufRead, BufReader};
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", entry, "--nocapture", "--test-threads=1"])
            .env(env, value)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut port = None;
        let mut lines = BufReader::new(stdout).lines();
        for line in lines.by_ref() {
            let line = line.unwrap();
            // libtest may have printed `test <entry> ... ` on the same line.
            if let Some((_, p)) = line.split_once("LISTENING ") {
                port = Some(p.trim().parse::<u16>().unwrap());
                break;
            }
        }
        let port = port.expect("the app process did not start");
        // Drain the rest of its output so that it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        AppProcess {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for AppProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An app process on a store that persists is killed (SIGKILL: what a crash or a deploy does)
/// and started again by `start` on the same data: its sessions are all there, with their
/// values, ids and counts, and a destroyed one stays destroyed.
pub async fn sessions_survive_an_app_restart(start: impl Fn() -> AppProcess) {
    use super::{Browser, Conn};
    let app = start();
    let mut alice = Browser::new(app.addr).await;
    for n in 1..=3 {
        assert_eq!(alice.get("/counter").await.body, n.to_string());
    }
    alice.get("/set/name?v=alice%20liddell").await;
    let mut others = Vec::new();
    for i in 0..20 {
        let mut b = Browser::new(app.addr).await;
        b.get(&format!("/set/n?v={i}")).await;
        others.push(b.cookie.clone().unwrap());
    }
    let mut bob = Browser::new(app.addr).await;
    bob.get("/counter").await;
    let bob_old = bob.cookie.clone().unwrap();
    assert!(bob.get("/destroy").await.removes_cookie());
    app.kill();

    let app = start();
    let mut c = Conn::http1(app.addr).await;
    let cookie = alice.cookie.clone().unwrap();
    assert_eq!(c.get("/read", Some(&cookie)).await.body, "3");
    assert_eq!(
        c.get("/get/name", Some(&cookie)).await.body,
        "alice liddell"
    );
    let r = c.get("/counter", Some(&cookie)).await;
    assert_eq!(r.body, "4");
    assert!(
        r.cookie_pair().is_none_or(|c| c == cookie),
        "the id changed"
    );
    for (i, cookie) in others.iter().enumerate() {
        assert_eq!(c.get("/get/n", Some(cookie)).await.body, i.to_string());
    }
    assert_eq!(c.get("/read", Some(&bob_old)).await.body, "0");
    app.kill();
}
