//! A multi-process cluster of `chat` processes for tests; see [`Cluster`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::{cassandra, unique_keyspace, ChatProcess, NatsCluster, NatsNodeAt, NatsServer, Netns};

/// A worker's store warm-up in tests: the shared test store is warm already, and a 3-node
/// ring's transactions never settle below the product's threshold, so at most 5 s (readiness
/// is awaited for 30 s).
const WARM_UP: [&str; 2] = ["--warm-up-secs", "5"];

/// How a [`Cluster`] is started; from [`Cluster::builder`].
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    binary: PathBuf,
    gateways: usize,
    workers: usize,
    cql: Option<String>,
    keyspace_prefix: String,
    admin_token: Option<String>,
    gateway_id_prefix: String,
    worker_id_prefix: String,
    send_rate: (u32, u32),
    roster_interval: Option<Duration>,
    gateway_args: Vec<String>,
    worker_args: Vec<String>,
    env: Vec<(String, String)>,
    nats_nodes: Vec<NatsNodeAt>,
    nats_host: std::net::IpAddr,
}

impl ClusterBuilder {
    /// Runs NATS as a cluster of these nodes (a current nats-server, JetStream R = nodes) instead
    /// of one Debian nats-server; processes get every node's URL and `--stream-replicas`.
    pub fn nats_cluster(mut self, nodes: Vec<NatsNodeAt>) -> Self {
        self.nats_nodes = nodes;
        self
    }

    /// The address the single nats-server listens on (default 127.0.0.1): a [`Netns`] link's
    /// host address lets processes inside that namespace reach it.
    pub fn nats_host(mut self, host: std::net::IpAddr) -> Self {
        self.nats_host = host;
        self
    }

    /// Gateways to start (default 1).
    pub fn gateways(mut self, n: usize) -> Self {
        self.gateways = n;
        self
    }

    /// Fanout workers to start (default 1).
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }

    /// The CQL node(s), `HOST:PORT[,...]` (default: the shared node, [`cassandra()`]), e.g. a
    /// [`DedicatedCassandra`](crate::DedicatedCassandra) an outage test freezes.
    pub fn cql(mut self, nodes: impl Into<String>) -> Self {
        self.cql = Some(nodes.into());
        self
    }

    /// Prefix of the cluster's unique keyspace (default `cluster`).
    pub fn keyspace_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.keyspace_prefix = prefix.into();
        self
    }

    /// `--admin-token` of every gateway and worker, turning their `/admin` API on (default off).
    pub fn admin_token(mut self, token: impl Into<String>) -> Self {
        self.admin_token = Some(token.into());
        self
    }

    /// Process ids: gateways `{gateway}N`, workers `{worker}N`, N from 1 (default `gw-` and
    /// `fanout-`, as `deploy/local/up` and the exercise pages name them).
    pub fn ids(mut self, gateway: impl Into<String>, worker: impl Into<String>) -> Self {
        self.gateway_id_prefix = gateway.into();
        self.worker_id_prefix = worker.into();
        self
    }

    /// Gateways' `--send-rate` and `--send-burst` (default 100000 each: tests pipeline sends,
    /// and the rate limit has tests of its own).
    pub fn send_rate(mut self, rate: u32, burst: u32) -> Self {
        self.send_rate = (rate, burst);
        self
    }

    /// Gateways' `--roster-interval-ms` (default: the binary's, 6 s). A dead gateway's users go
    /// offline within 4 intervals.
    pub fn roster_interval(mut self, interval: Duration) -> Self {
        self.roster_interval = Some(interval);
        self
    }

    /// A further flag (or value) for every gateway, after the others.
    pub fn gateway_arg(mut self, arg: impl Into<String>) -> Self {
        self.gateway_args.push(arg.into());
        self
    }

    /// A further flag (or value) for every fanout worker, after the others.
    pub fn worker_arg(mut self, arg: impl Into<String>) -> Self {
        self.worker_args.push(arg.into());
        self
    }

    /// An environment variable of every process (`RUST_LOG` is `warn` unless set here or in the
    /// test's own environment).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Starts NATS, then the workers, then the gateways, each waited for until its `/readyz`
    /// answers 200. The first process creates the keyspace and schema; the others start after it
    /// is ready, so no two processes race on DDL.
    pub async fn start(self) -> Cluster {
        let cql = match &self.cql {
            Some(nodes) => nodes.clone(),
            None => tokio::task::spawn_blocking(cassandra).await.expect("start the shared Cassandra node"),
        };
        check_reachable(&cql).await;
        let nats = if self.nats_nodes.is_empty() {
            Nats::Single(NatsServer::start_on(self.nats_host, &[]).await)
        } else {
            Nats::Cluster(NatsCluster::start(&self.nats_nodes).await)
        };
        let keyspace = unique_keyspace(&self.keyspace_prefix);
        let (gateways, workers) = (self.gateways, self.workers);
        let mut cluster = Cluster { gateways: Vec::new(), workers: Vec::new(), nats, cql, keyspace, options: self };
        for _ in 0..workers {
            cluster.add_worker().await;
        }
        for _ in 0..gateways {
            cluster.add_gateway().await;
        }
        cluster
    }
}

/// Fails the test at once, saying what to do, when no CQL node answers at `nodes`.
async fn check_reachable(nodes: &str) {
    let first = nodes.split(',').next().unwrap_or(nodes).trim();
    let connect = tokio::net::TcpStream::connect(first);
    match tokio::time::timeout(Duration::from_secs(5), connect).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            panic!("no CQL node at {first} ({e}): start one with deploy/cassandra/start or set CHAT_TEST_CQL")
        }
        Err(_) => panic!("the CQL node at {first} did not accept a connection in 5 s"),
    }
}

/// The cluster's NATS: one server, or a cluster of them (one per test cluster: size is no matter).
#[allow(clippy::large_enum_variant)]
enum Nats {
    Single(NatsServer),
    Cluster(NatsCluster),
}

impl Nats {
    fn urls(&self) -> String {
        match self {
            Nats::Single(server) => server.url(),
            Nats::Cluster(cluster) => cluster.urls(),
        }
    }
}

/// A running cluster: a nats-server of its own, fanout workers and gateways as `chat`
/// subprocesses, all on one Cassandra node (the shared one by default) in a keyspace of their own.
///
/// ```no_run
/// # async fn example(chat_binary: &std::path::Path) {
/// // In a test of the chat package the binary is env!("CARGO_BIN_EXE_chat").
/// let cluster = testkit::Cluster::builder(chat_binary).gateways(2).workers(2).start().await;
/// let ws = cluster.gateway_ws(0); // ws://127.0.0.1:PORT/ws of gw-1
/// # }
/// ```
///
/// Processes are named as `deploy/local/up` names them: gateways `gw-1`, `gw-2`, … and workers
/// `fanout-1`, `fanout-2`, … (index 0 is number 1). They live in slots: a killed one leaves its
/// slot empty, so the indexes of the others never shift. Every process is killed when the
/// cluster is dropped (gateways, then workers, then NATS); the keyspace stays on the node.
pub struct Cluster {
    // Dropped in this order: gateways, workers, then NATS.
    gateways: Vec<Option<ChatProcess>>,
    workers: Vec<Option<ChatProcess>>,
    nats: Nats,
    cql: String,
    keyspace: String,
    options: ClusterBuilder,
}

impl Cluster {
    /// A cluster of `chat` processes run from `binary` (in a test of the `chat` package:
    /// `env!("CARGO_BIN_EXE_chat")`): one gateway and one worker unless told otherwise.
    pub fn builder(binary: impl AsRef<Path>) -> ClusterBuilder {
        ClusterBuilder {
            binary: binary.as_ref().to_owned(),
            gateways: 1,
            workers: 1,
            cql: None,
            keyspace_prefix: "cluster".into(),
            admin_token: None,
            gateway_id_prefix: "gw-".into(),
            worker_id_prefix: "fanout-".into(),
            send_rate: (100_000, 100_000),
            roster_interval: None,
            gateway_args: Vec::new(),
            worker_args: Vec::new(),
            env: Vec::new(),
            nats_nodes: Vec::new(),
            nats_host: std::net::IpAddr::from([127, 0, 0, 1]),
        }
    }

    /// The `chat` binary the processes run.
    pub fn binary(&self) -> &Path {
        &self.options.binary
    }

    /// The cluster's nats-server (restart it with [`NatsServer::restart`] through
    /// [`nats_mut`](Cluster::nats_mut)).
    /// Panics when the cluster runs a NATS cluster ([`nats_cluster_mut`](Cluster::nats_cluster_mut)).
    pub fn nats(&self) -> &NatsServer {
        match &self.nats {
            Nats::Single(server) => server,
            Nats::Cluster(_) => panic!("this cluster runs a NATS cluster: use nats_cluster_mut"),
        }
    }

    /// The nats-server, mutably (to kill or restart it).
    pub fn nats_mut(&mut self) -> &mut NatsServer {
        match &mut self.nats {
            Nats::Single(server) => server,
            Nats::Cluster(_) => panic!("this cluster runs a NATS cluster: use nats_cluster_mut"),
        }
    }

    /// The NATS cluster, mutably (to kill or restart a node); panics with a single server.
    pub fn nats_cluster_mut(&mut self) -> &mut NatsCluster {
        match &mut self.nats {
            Nats::Cluster(cluster) => cluster,
            Nats::Single(_) => panic!("this cluster runs one nats-server: use nats_mut"),
        }
    }

    /// What `--nats` gets: `nats://HOST:PORT`, or every node's URL comma-separated.
    pub fn nats_url(&self) -> String {
        self.nats.urls()
    }

    /// The single nats-server's client address (e.g. for a [`Relay`](crate::Relay) to it).
    pub fn nats_addr(&self) -> SocketAddr {
        self.nats().addr()
    }

    /// The CQL contact points.
    pub fn cql(&self) -> &str {
        &self.cql
    }

    /// The cluster's keyspace.
    pub fn keyspace(&self) -> &str {
        &self.keyspace
    }

    /// Gateway `index` (0 is `gw-1`); panics when it was killed or never started.
    pub fn gateway(&self, index: usize) -> &ChatProcess {
        self.gateways.get(index).and_then(Option::as_ref).unwrap_or_else(|| panic!("gateway {index} is not running"))
    }

    /// Worker `index` (0 is `fanout-1`); panics when it was killed or never started.
    pub fn worker(&self, index: usize) -> &ChatProcess {
        self.workers.get(index).and_then(Option::as_ref).unwrap_or_else(|| panic!("worker {index} is not running"))
    }

    /// `http://ADDR` of gateway `index`.
    pub fn gateway_url(&self, index: usize) -> String {
        self.gateway(index).http_url()
    }

    /// `ws://ADDR/ws` of gateway `index`.
    pub fn gateway_ws(&self, index: usize) -> String {
        self.gateway(index).ws_url()
    }

    /// `http://ADDR` of worker `index` (its `/readyz`, `/metrics`, `/debug`, `/admin`).
    pub fn worker_url(&self, index: usize) -> String {
        self.worker(index).http_url()
    }

    /// The id gateway `index` runs with (`gw-1` for index 0 by default).
    pub fn gateway_id(&self, index: usize) -> String {
        format!("{}{}", self.options.gateway_id_prefix, index + 1)
    }

    /// The id worker `index` runs with (`fanout-1` for index 0 by default).
    pub fn worker_id(&self, index: usize) -> String {
        format!("{}{}", self.options.worker_id_prefix, index + 1)
    }

    /// Starts one more gateway on the cluster's NATS; its index.
    pub async fn add_gateway(&mut self) -> usize {
        let nats = self.nats.urls();
        self.add_gateway_on(&nats).await
    }

    /// Starts one more gateway that reaches NATS at `nats_url` (say, through a
    /// [`Relay`](crate::Relay) the test cuts); its index.
    pub async fn add_gateway_on(&mut self, nats_url: &str) -> usize {
        let index = self.gateways.len();
        let mut args = vec!["gateway".to_owned(), "--gateway-id".into(), self.gateway_id(index)];
        let (rate, burst) = self.options.send_rate;
        args.extend(["--send-rate".into(), rate.to_string(), "--send-burst".into(), burst.to_string()]);
        if let Some(interval) = self.options.roster_interval {
            args.extend(["--roster-interval-ms".into(), interval.as_millis().to_string()]);
        }
        args.extend(self.common_args(nats_url));
        args.extend(self.options.gateway_args.iter().cloned());
        let process = self.spawn(&args).await;
        self.gateways.push(Some(process));
        index
    }

    /// Starts one more fanout worker; its index.
    pub async fn add_worker(&mut self) -> usize {
        let index = self.workers.len();
        let mut args = vec!["fanout".to_owned(), "--worker-id".into(), self.worker_id(index)];
        args.extend(WARM_UP.iter().map(|a| a.to_string()));
        args.extend(self.common_args(&self.nats.urls()));
        args.extend(self.options.worker_args.iter().cloned());
        let process = self.spawn(&args).await;
        self.workers.push(Some(process));
        index
    }

    /// Starts one more gateway inside `netns`, listening on its address of link `client_link`
    /// and reaching NATS at `nats_url` and the store at `cql` (both through its links); its
    /// index.
    pub async fn add_gateway_in(&mut self, netns: &Netns, client_link: usize, nats_url: &str, cql: &str) -> usize {
        let index = self.gateways.len();
        let mut args = vec!["gateway".to_owned(), "--gateway-id".into(), self.gateway_id(index)];
        let (rate, burst) = self.options.send_rate;
        args.extend(["--send-rate".into(), rate.to_string(), "--send-burst".into(), burst.to_string()]);
        args.extend(self.args_in(netns, client_link, nats_url, cql));
        args.extend(self.options.gateway_args.iter().cloned());
        let process = self.spawn_in(Some(netns.name()), &args).await;
        self.gateways.push(Some(process));
        index
    }

    /// Starts one more fanout worker inside `netns` (its `/metrics` on link `link`), reaching
    /// NATS at `nats_url` and the store at `cql`; its index.
    pub async fn add_worker_in(&mut self, netns: &Netns, link: usize, nats_url: &str, cql: &str) -> usize {
        let index = self.workers.len();
        let mut args = vec!["fanout".to_owned(), "--worker-id".into(), self.worker_id(index)];
        args.extend(WARM_UP.iter().map(|a| a.to_string()));
        args.extend(self.args_in(netns, link, nats_url, cql));
        args.extend(self.options.worker_args.iter().cloned());
        let process = self.spawn_in(Some(netns.name()), &args).await;
        self.workers.push(Some(process));
        index
    }

    /// kill -9 of gateway `index`; its slot stays empty.
    pub async fn kill_gateway(&mut self, index: usize) {
        let process = self.gateways.get_mut(index).and_then(Option::take);
        process.unwrap_or_else(|| panic!("gateway {index} is not running")).kill().await;
    }

    /// kill -9 of worker `index`; its slot stays empty.
    pub async fn kill_worker(&mut self, index: usize) {
        let process = self.workers.get_mut(index).and_then(Option::take);
        process.unwrap_or_else(|| panic!("worker {index} is not running")).kill().await;
    }

    /// SIGTERM to worker `index` and wait (bounded) for its clean exit; whether it exited in
    /// time. Its slot stays empty.
    pub async fn terminate_worker(&mut self, index: usize, within: Duration) -> bool {
        let process = self.workers.get_mut(index).and_then(Option::take);
        process.unwrap_or_else(|| panic!("worker {index} is not running")).terminate(within).await
    }

    /// Waits until every running process answers `/readyz` with 200 (after NATS came back, say).
    pub async fn wait_ready(&self) {
        for process in self.gateways.iter().chain(&self.workers).flatten() {
            process.wait_ready().await;
        }
    }

    /// [`common_args`](Self::common_args) for a process in `netns`: it listens on the
    /// namespace's address of `link` and uses the store at `cql`.
    fn args_in(&self, netns: &Netns, link: usize, nats_url: &str, cql: &str) -> Vec<String> {
        let mut args = self.common_args(nats_url);
        let listen = args.iter().position(|a| a == "--listen").expect("--listen") + 1;
        args[listen] = format!("{}:0", netns.inner_ip(link));
        let store = args.iter().position(|a| a == "--cql").expect("--cql") + 1;
        args[store] = cql.to_owned();
        args
    }

    /// `--listen`, NATS, CQL, keyspace and admin token: what every process gets.
    fn common_args(&self, nats_url: &str) -> Vec<String> {
        let mut args: Vec<String> = ["--listen", "127.0.0.1:0", "--nats", nats_url, "--cql", &self.cql]
            .into_iter()
            .chain(["--keyspace", &self.keyspace])
            .map(String::from)
            .collect();
        if let Some(token) = &self.options.admin_token {
            args.extend(["--admin-token".into(), token.clone()]);
        }
        if let Nats::Cluster(_) = &self.nats {
            args.extend(["--stream-replicas".into(), self.options.nats_nodes.len().to_string()]);
        }
        args
    }

    async fn spawn(&self, args: &[String]) -> ChatProcess {
        self.spawn_in(None, args).await
    }

    async fn spawn_in(&self, netns: Option<&str>, args: &[String]) -> ChatProcess {
        let env: Vec<(&str, &str)> = self.options.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let process = ChatProcess::start_in(netns, &self.options.binary, args, &env).await;
        process.wait_ready().await;
        process
    }
}
