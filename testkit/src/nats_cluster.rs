//! A real multi-node NATS cluster with JetStream (a current nats-server, see
//! `deploy/tools/nats-server`), for tests that kill or partition one node.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use crate::{workspace_root, Netns, START_TIMEOUT};

/// Where one node of a [`NatsCluster`] runs.
#[derive(Debug, Clone)]
pub struct NatsNodeAt {
    /// The address it listens on (clients, routes and monitoring).
    pub ip: IpAddr,
    /// The network namespace it runs in (`ip netns exec`), if not the host's.
    pub netns: Option<String>,
}

impl NatsNodeAt {
    /// On the host's loopback.
    pub fn loopback() -> Self {
        Self { ip: IpAddr::V4(Ipv4Addr::LOCALHOST), netns: None }
    }

    /// Inside `netns`, on its address of link `link`.
    pub fn inside(netns: &Netns, link: usize) -> Self {
        Self { ip: IpAddr::V4(netns.inner_ip(link)), netns: Some(netns.name().to_owned()) }
    }
}

struct Node {
    at: NatsNodeAt,
    client_port: u16,
    monitor_port: u16,
    config: PathBuf,
    child: Option<Child>,
}

/// A running NATS cluster (JetStream on every node), every node killed on drop.
pub struct NatsCluster {
    nodes: Vec<Node>,
    dir: tempfile::TempDir,
}

/// The current nats-server (`CHAT_NATS_SERVER_CURRENT`, else built once by
/// `deploy/tools/nats-server`).
fn current_nats_binary() -> PathBuf {
    static BINARY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BINARY
        .get_or_init(|| {
            if let Ok(path) = std::env::var("CHAT_NATS_SERVER_CURRENT") {
                return PathBuf::from(path);
            }
            let output = std::process::Command::new(workspace_root().join("deploy/tools/nats-server"))
                .stderr(Stdio::inherit())
                .output()
                .expect("run deploy/tools/nats-server");
            assert!(output.status.success(), "deploy/tools/nats-server could not provide a current nats-server");
            PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
        })
        .clone()
}

impl NatsCluster {
    /// Starts a cluster of `nodes.len()` servers and waits until JetStream is ready on all.
    pub async fn start(nodes: &[NatsNodeAt]) -> NatsCluster {
        let dir = tempfile::Builder::new().prefix("chat-nats-cluster-").tempdir().expect("temp dir");
        let route_ports: Vec<u16> = nodes.iter().map(|_| crate::free_port()).collect();
        let routes: Vec<String> =
            nodes.iter().zip(&route_ports).map(|(at, port)| format!("\"nats://{}:{port}\"", at.ip)).collect();
        let mut cluster = NatsCluster { nodes: Vec::new(), dir };
        for (index, at) in nodes.iter().enumerate() {
            let (client_port, monitor_port) = (crate::free_port(), crate::free_port());
            let store = cluster.dir.path().join(format!("n{}", index + 1));
            let config = cluster.dir.path().join(format!("n{}.conf", index + 1));
            let text = format!(
                "server_name: n{n}\nlisten: \"{ip}:{client_port}\"\nhttp: \"{ip}:{monitor_port}\"\n\
                 jetstream {{ store_dir: \"{store}\", max_memory_store: 256MB, max_file_store: 2GB }}\n\
                 cluster {{ name: chat-test, listen: \"{ip}:{route}\", routes: [{routes}] }}\n",
                n = index + 1,
                ip = at.ip,
                store = store.display(),
                route = route_ports[index],
                routes = routes.join(", "),
            );
            std::fs::write(&config, text).expect("write nats config");
            cluster.nodes.push(Node { at: at.clone(), client_port, monitor_port, config, child: None });
        }
        for index in 0..cluster.nodes.len() {
            cluster.spawn(index);
        }
        for index in 0..cluster.nodes.len() {
            cluster.wait_healthy(index).await;
        }
        cluster
    }

    fn spawn(&mut self, index: usize) {
        let node = &mut self.nodes[index];
        let log = std::fs::File::create(self.dir.path().join(format!("n{}.log", index + 1))).expect("nats log file");
        let mut command = match &node.at.netns {
            Some(netns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", netns]).arg(current_nats_binary());
                command
            }
            None => Command::new(current_nats_binary()),
        };
        command.arg("-c").arg(&node.config).stdout(Stdio::null()).stderr(log).kill_on_drop(true);
        node.child = Some(command.spawn().expect("spawn nats-server"));
    }

    /// Waits until node `index` says JetStream is healthy (`/healthz`), i.e. it has joined the
    /// cluster and caught up.
    pub async fn wait_healthy(&self, index: usize) {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build().expect("HTTP client");
        let node = &self.nodes[index];
        let url = format!("http://{}:{}/healthz", node.at.ip, node.monitor_port);
        let deadline = tokio::time::Instant::now() + START_TIMEOUT * 3;
        loop {
            if let Ok(response) = http.get(&url).send().await {
                if response.status() == 200 {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "NATS node {} not healthy at {url}; log in {:?}",
                index + 1,
                self.dir.path()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Every node's client URL, comma-separated (what `--nats` takes).
    pub fn urls(&self) -> String {
        self.nodes.iter().map(|n| format!("nats://{}:{}", n.at.ip, n.client_port)).collect::<Vec<_>>().join(",")
    }

    /// Node `index`'s monitoring base URL (`/healthz`, `/jsz`, `/routez`).
    pub fn monitor_url(&self, index: usize) -> String {
        format!("http://{}:{}", self.nodes[index].at.ip, self.nodes[index].monitor_port)
    }

    /// The index of the node leading JetStream stream `stream`, as node `asked` sees it.
    pub async fn stream_leader(&self, stream: &str, asked: usize) -> Option<usize> {
        let url = format!("{}/jsz?streams=true", self.monitor_url(asked));
        let jsz: serde_json::Value = reqwest::get(&url).await.ok()?.json().await.ok()?;
        let accounts = jsz["account_details"].as_array()?;
        let detail = accounts.iter().flat_map(|a| a["stream_detail"].as_array().into_iter().flatten());
        let leader = detail.filter(|d| d["name"] == stream).find_map(|d| d["cluster"]["leader"].as_str())?;
        leader.strip_prefix('n')?.parse::<usize>().ok().map(|n| n - 1)
    }

    /// Node `index`'s client address.
    pub fn addr(&self, index: usize) -> SocketAddr {
        SocketAddr::new(self.nodes[index].at.ip, self.nodes[index].client_port)
    }

    /// kill -9 of node `index` (its store stays for a restart).
    pub async fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.nodes[index].child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    /// Starts node `index` again on the same ports and store and waits until it is healthy.
    pub async fn restart(&mut self, index: usize) {
        self.kill(index).await;
        self.spawn(index);
        self.wait_healthy(index).await;
    }
}
