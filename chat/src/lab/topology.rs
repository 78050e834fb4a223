//! Starting and stopping a round's processes: the chat processes its challenge needs, a
//! background `loadgen` per process, and the planted faults.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::catalog::{Plant, Topology, PREFIX, ROOMS};
use super::round::Started;

/// Each chat process's id and base URL (`http://127.0.0.1:PORT`).
pub type Urls = Vec<(String, String)>;

/// How long a process may take to answer `/readyz`.
const READY_WITHIN: Duration = Duration::from_secs(30);
/// The cluster workers' ack wait in the lab, in milliseconds: 4 s, shorter than a send's 5 s
/// deadline, so a stalled worker's sends are redelivered while they can still be stored, which
/// is what the stall challenges are about. (With the default, 8 s, every redelivered copy is
/// already past its deadline.)
const LAB_ACK_WAIT_MS: &str = "4000";
/// How long a process may take to exit after SIGTERM before it is killed.
const EXIT_WITHIN: Duration = Duration::from_secs(10);

/// Where a round's programs are and where it listens.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The `chat` binary.
    pub chat: PathBuf,
    /// The `loadgen` binary.
    pub loadgen: PathBuf,
    /// Port of the first process; the others follow.
    pub base_port: u16,
    /// The round's directory (data, logs).
    pub dir: PathBuf,
    /// The admin token of the processes.
    pub admin_token: String,
    /// OTLP endpoint the processes export spans to, if any.
    pub otlp_endpoint: Option<String>,
}

impl Launch {
    /// The binaries beside this one (`cargo build --release -p chat -p loadgen` puts them
    /// together), unless `loadgen` is given.
    pub fn binaries(loadgen: Option<PathBuf>) -> anyhow::Result<(PathBuf, PathBuf)> {
        let chat = std::env::current_exe().context("finding the chat binary")?;
        let loadgen = loadgen.unwrap_or_else(|| chat.with_file_name("loadgen"));
        if !loadgen.is_file() {
            bail!(
                "{} not found: build it beside chat (cargo build --release -p chat -p loadgen) or pass --loadgen",
                loadgen.display()
            );
        }
        Ok((chat, loadgen))
    }

    /// Starts the chat processes of `topology`; returns them and their ids and base URLs.
    pub fn start_chat(&self, topology: Topology) -> anyhow::Result<(Vec<Started>, Urls)> {
        if topology == Topology::Cluster {
            return self.start_cluster();
        }
        let ports: Vec<u16> = (0..topology.processes().len()).map(|i| self.base_port + i as u16).collect();
        for port in &ports {
            if std::net::TcpListener::bind(("127.0.0.1", *port)).is_err() {
                bail!("port {port} is taken (another round, or `chat` running?): pick others with --port");
            }
        }
        let mut started = Vec::new();
        let mut urls = Vec::new();
        for (name, port) in topology.processes().iter().zip(ports) {
            let data = self.dir.join("data").join(name);
            std::fs::create_dir_all(&data).with_context(|| format!("creating {}", data.display()))?;
            let mut command = Command::new(&self.chat);
            command
                .arg("--listen")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--data-dir")
                .arg(&data)
                .arg("--gateway-id")
                .arg(name)
                .env("CHAT_ADMIN_TOKEN", &self.admin_token)
                // The lab's traffic comes from one address and sends quickly.
                .env("CHAT_MAX_CONNECTIONS_PER_IP", "0")
                .env("OTEL_RESOURCE_ATTRIBUTES", format!("service.instance.id={name}"));
            if let Some(endpoint) = &self.otlp_endpoint {
                command.env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint);
            }
            started.push(self.spawn(name, command)?);
            urls.push((name.to_string(), format!("http://127.0.0.1:{port}")));
        }
        Ok((started, urls))
    }

    /// The cluster's state directory (`CHAT_LOCAL_DIR` of `deploy/local/up`).
    pub fn cluster_dir(&self) -> PathBuf {
        self.dir.join("cluster")
    }

    /// Starts the local cluster with `deploy/local/up` (NATS, two workers, two gateways; a CQL
    /// store of its own unless `CHAT_LOCAL_CQL_NODES` names one) in a keyspace of its own.
    fn start_cluster(&self) -> anyhow::Result<(Vec<Started>, Urls)> {
        let ports = [("gw-1", 8081), ("gw-2", 8082), ("fanout-1", 9091), ("fanout-2", 9092)];
        for port in ports.iter().map(|(_, port)| *port).chain([4222]) {
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
                bail!("port {port} is taken (a cluster running? deploy/local/down stops it)");
            }
        }
        let up = deploy_script("local/up")?;
        let dir = self.cluster_dir();
        let mut command = Command::new(&up);
        command
            .env("CHAT_LOCAL_DIR", &dir)
            .env("CHAT_BIN", &self.chat)
            .env("CHAT_ADMIN_TOKEN", &self.admin_token)
            .env("CHAT_CQL_KEYSPACE", format!("lab_{}", &self.admin_token[..12]))
            .env("CHAT_ACK_WAIT_MS", LAB_ACK_WAIT_MS)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if let Some(endpoint) = &self.otlp_endpoint {
            command.env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint);
        }
        let output = command.output().with_context(|| format!("running {}", up.display()))?;
        let pids = cluster_processes(&dir);
        if !output.status.success() {
            let _ = stop_cluster(&dir);
            bail!("{} failed: {}", up.display(), String::from_utf8_lossy(&output.stderr).trim());
        }
        let urls = ports.iter().map(|(name, port)| (name.to_string(), format!("http://127.0.0.1:{port}"))).collect();
        Ok((pids, urls))
    }

    /// Starts a background `loadgen` against each process (one spanning the gateways, on a
    /// cluster): 24 clients in the lab's rooms (three each on a cluster), 30 sends a second, for
    /// hours.
    pub fn start_traffic(&self, urls: &[(String, String)], seed: u64) -> anyhow::Result<Vec<Started>> {
        let mut started = Vec::new();
        // On a cluster one run spans the gateways, so rooms have members on both.
        let gateways: Vec<(String, String)> =
            urls.iter().filter(|(name, _)| name.starts_with("gw-")).cloned().collect();
        let targets: Vec<(String, String)> = if gateways.is_empty() {
            urls.to_vec()
        } else {
            let joined = gateways.iter().map(|(_, url)| url.clone()).collect::<Vec<_>>().join(",");
            vec![("cluster".to_owned(), joined)]
        };
        let rooms_per_client = if gateways.is_empty() { "1" } else { "3" };
        for (name, url) in &targets {
            let ws: Vec<String> = url.split(',').map(|u| format!("{}/ws", u.replacen("http://", "ws://", 1))).collect();
            let mut command = Command::new(&self.loadgen);
            command
                .arg("--url")
                .arg(ws.join(","))
                // On a cluster, three rooms each: with one, client i's room (i mod 8) and gateway
                // (i mod 2) would line up, and no room would have members on both gateways.
                // Elsewhere one: a connection's acks share its writes with its deliveries.
                .args(["--clients", "24", "--rooms", &ROOMS.to_string(), "--rooms-per-client", rooms_per_client])
                .args(["--rate", "30", "--duration", "4h"])
                .args(["--prefix", &format!("{PREFIX}bg"), "--room-prefix", PREFIX])
                .args(["--seed", &seed.to_string(), "--progress", "never"])
                .args(["--journeys", "0"]);
            started.push(self.spawn(&format!("loadgen-{name}"), command)?);
        }
        Ok(started)
    }

    /// Starts `command` in a process group of its own (so a terminal's Ctrl-C does not reach
    /// it), output to `logs/NAME.log`.
    fn spawn(&self, name: &str, mut command: Command) -> anyhow::Result<Started> {
        use std::os::unix::process::CommandExt;
        let logs = self.dir.join("logs");
        std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
        let log_path = logs.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let program = command.get_program().to_owned();
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", Path::new(&program).display()))?;
        let program = Path::new(&program).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        Ok(Started { name: name.to_owned(), pid: child.id(), program })
    }
}

/// A script under the repository's `deploy/`, found from `CHAT_LAB_REPO` or upwards from the
/// chat binary (`target/release/chat` lies two levels below the repository).
fn deploy_script(name: &str) -> anyhow::Result<PathBuf> {
    let roots: Vec<PathBuf> = match std::env::var_os("CHAT_LAB_REPO") {
        Some(root) => vec![PathBuf::from(root)],
        None => std::env::current_exe()?.ancestors().map(Path::to_path_buf).collect(),
    };
    roots
        .iter()
        .map(|root| root.join("deploy").join(name))
        .find(|script| script.is_file())
        .with_context(|| format!("deploy/{name} not found above the chat binary; set CHAT_LAB_REPO to the repository"))
}

/// The processes `deploy/local/up` started in `dir`, from its pid files.
fn cluster_processes(dir: &Path) -> Vec<Started> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut started: Vec<Started> = entries
        .flatten()
        .filter_map(|entry| {
            let path = entry.path();
            let name = path.file_name()?.to_str()?.strip_suffix(".pid")?.to_owned();
            let pid: u32 = std::fs::read_to_string(&path).ok()?.trim().parse().ok()?;
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let program = cmdline.split(|b| *b == 0).next().unwrap_or_default();
            let program = Path::new(std::str::from_utf8(program).unwrap_or_default()).file_name()?.to_str()?.to_owned();
            Some(Started { name, pid, program })
        })
        .collect();
    started.sort_by(|a, b| a.name.cmp(&b.name));
    started
}

/// The cluster's NATS monitoring URL (`deploy/local/up` serves it on the client port + 4000):
/// `/connz?subs=1` lists each process's connection and subscriptions.
pub const BUS_MONITOR: &str = "http://127.0.0.1:8222";

/// Restarts the cluster's NATS server in `dir` as an operator would for maintenance: SIGTERM,
/// then the same command line again (JetStream keeps its streams on disk). Every process
/// reconnects. Returns the cluster's processes, the new server among them.
pub async fn restart_bus(dir: &Path) -> anyhow::Result<Vec<Started>> {
    use std::os::unix::process::CommandExt;
    let pid_file = dir.join("nats.pid");
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .with_context(|| format!("reading {}", pid_file.display()))?
        .trim()
        .parse()
        .with_context(|| format!("parsing {}", pid_file.display()))?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).context("reading NATS's command line")?;
    let argv: Vec<String> =
        cmdline.split(|b| *b == 0).filter(|a| !a.is_empty()).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    let Some((program, args)) = argv.split_first() else { bail!("NATS (pid {pid}) has no command line") };
    let server = cluster_processes(dir).into_iter().find(|p| p.pid == pid).context("NATS is not running")?;
    // SIGTERM, and SIGKILL if it lingers: either way it is gone after this.
    stop(std::slice::from_ref(&server)).await;
    let log_path = dir.join("logs").join("nats.log");
    let log = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(&log_path)
        .with_context(|| format!("opening {}", log_path.display()))?;
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("restarting {program}"))?;
    std::fs::write(&pid_file, format!("{}\n", child.id()))
        .with_context(|| format!("writing {}", pid_file.display()))?;
    Ok(cluster_processes(dir))
}

/// Stops the cluster in `dir` with `deploy/local/down`.
pub fn stop_cluster(dir: &Path) -> anyhow::Result<()> {
    let down = deploy_script("local/down")?;
    let output = Command::new(&down).env("CHAT_LOCAL_DIR", dir).stdin(Stdio::null()).output()?;
    if !output.status.success() {
        bail!("{} failed: {}", down.display(), String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}

/// Waits until every process answers `/readyz` with 200 (and is the one started: a process
/// that exited, say because its port was taken, fails the wait).
pub async fn wait_ready(urls: &[(String, String)], processes: &[Started]) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + READY_WITHIN;
    for (name, url) in urls {
        loop {
            if let Some(exited) = processes.iter().find(|p| p.name == *name && !alive(p)) {
                bail!("{} exited at start (is {url} taken?); see its log in the lab directory", exited.name);
            }
            let ready = client.get(format!("{url}/readyz")).send().await.is_ok_and(|r| r.status().is_success());
            if ready {
                break;
            }
            if Instant::now() > deadline {
                bail!("{name} ({url}) not ready within {READY_WITHIN:?}; see its log in the lab directory");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// How long the background traffic may take to flow through every gateway: its clients connect
/// and join all their rooms before the first send, so on a starved machine this takes a while.
const TRAFFIC_WITHIN: Duration = Duration::from_secs(60);

/// Waits until every gateway among `urls` has written a message frame to a connection
/// (`chat_deliveries_total` above 0). The background loadgen sends only once each of its clients
/// has joined every room, so by then each gateway follows the rooms its members joined.
pub async fn wait_traffic(urls: &[(String, String)]) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + TRAFFIC_WITHIN;
    for (name, url) in urls.iter().filter(|(name, _)| name.starts_with("gw-")) {
        loop {
            let metrics = match client.get(format!("{url}/metrics")).send().await {
                Ok(response) => response.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            if deliveries(&metrics) > 0.0 {
                break;
            }
            if Instant::now() > deadline {
                bail!("{name} ({url}) delivered no traffic within {TRAFFIC_WITHIN:?}; see the loadgen log in the lab directory");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(())
}

/// `chat_deliveries_total` in a Prometheus text exposition, 0 when absent.
fn deliveries(metrics: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("chat_deliveries_total "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Plants each fault in its process through `POST /admin/faults`.
pub async fn plant(plants: &[Plant], urls: &[(String, String)], admin_token: &str) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    for plant in plants {
        let Some((_, url)) = urls.iter().find(|(name, _)| *name == plant.process) else {
            bail!("no process {} in this round", plant.process);
        };
        let response = client
            .post(format!("{url}/admin/faults"))
            .bearer_auth(admin_token)
            .json(&plant.fault)
            .send()
            .await
            .with_context(|| format!("planting in {}", plant.process))?;
        let status = response.status();
        if !status.is_success() {
            bail!("planting in {}: {status}: {}", plant.process, response.text().await.unwrap_or_default());
        }
    }
    Ok(())
}

/// Whether `process` is still running (and is still the program it was: pids are reused). A
/// process being torn down after SIGKILL has no command line any more but still runs: its
/// name in `/proc/PID/stat` (first 15 bytes of the program's) tells it apart from a reused pid.
pub fn alive(process: &Started) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", process.pid)) else { return false };
    let Some((head, rest)) = stat.rsplit_once(") ") else { return false };
    // A zombie has exited; only its parent's wait is missing.
    if rest.starts_with('Z') {
        return false;
    }
    let comm = head.split_once(" (").map(|(_, comm)| comm).unwrap_or_default();
    let short: String = process.program.chars().take(15).collect();
    comm == short
}

/// Stops the processes: SIGTERM (a graceful shutdown), then SIGKILL for any still running
/// after [`EXIT_WITHIN`]. Returns the names of those that had to be killed.
pub async fn stop(processes: &[Started]) -> Vec<String> {
    let signal = |process: &Started, signal: Signal| {
        if alive(process) {
            if let Ok(pid) = i32::try_from(process.pid) {
                let _ = kill(Pid::from_raw(pid), signal);
            }
        }
    };
    // Traffic first, so the servers' shutdown is not a storm of reconnects.
    let (traffic, servers): (Vec<&Started>, Vec<&Started>) = processes.iter().partition(|p| p.program == "loadgen");
    let mut killed = Vec::new();
    for group in [traffic, servers] {
        for process in &group {
            signal(process, Signal::SIGTERM);
        }
        let deadline = Instant::now() + EXIT_WITHIN;
        while group.iter().any(|p| alive(p)) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for process in group.iter().filter(|p| alive(p)) {
            signal(process, Signal::SIGKILL);
            killed.push(process.name.clone());
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while processes.iter().any(alive) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    killed
}

#[cfg(test)]
mod tests {
    use super::deliveries;

    #[test]
    fn deliveries_are_read_from_the_exposition_and_absent_is_none() {
        let text = "# HELP chat_deliveries_total Message frames written to connections.\n\
                    # TYPE chat_deliveries_total counter\n\
                    chat_deliveries_total 42\n\
                    chat_deliveries_totalx 7\n";
        assert_eq!(deliveries(text), 42.0);
        assert_eq!(deliveries("chat_connections 3\n"), 0.0);
        assert_eq!(deliveries(""), 0.0);
    }
}
