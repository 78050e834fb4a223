//! A real `prometheus` scraping test processes, and `promtool`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

/// A running `prometheus` scraping chat processes every second, killed on drop.
///
/// Its config, TSDB and log live in a temp dir; the log is printed when it fails to start.
pub struct Prometheus {
    child: std::process::Child,
    port: u16,
    dir: tempfile::TempDir,
    http: reqwest::Client,
}

/// The `prometheus` binary (`CHAT_PROMETHEUS` or on the PATH); panics with how to install it.
fn prometheus_binary() -> String {
    let binary = std::env::var("CHAT_PROMETHEUS").unwrap_or_else(|_| "prometheus".into());
    if std::process::Command::new(&binary).arg("--version").output().is_err() {
        panic!("`{binary}` not found: install it (`apt-get install prometheus`) or set CHAT_PROMETHEUS");
    }
    binary
}

/// Runs `promtool ARGS...` (`CHAT_PROMTOOL` or on the PATH) and returns its output; panics with
/// how to install it when missing.
pub fn promtool(args: &[&str]) -> std::process::Output {
    let binary = std::env::var("CHAT_PROMTOOL").unwrap_or_else(|_| "promtool".into());
    std::process::Command::new(&binary).args(args).output().unwrap_or_else(|e| {
        panic!("`{binary}` could not run ({e}): install it (`apt-get install prometheus`, which ships promtool) or set CHAT_PROMTOOL")
    })
}

impl Prometheus {
    /// Starts Prometheus scraping `/metrics` of each `host:port` target (job `chat`) every second.
    pub async fn start(targets: &[String]) -> Prometheus {
        Self::start_with_rules(targets, &[]).await
    }

    /// As [`Prometheus::start`], also loading these rule files (evaluated every second).
    pub async fn start_with_rules(targets: &[String], rule_files: &[PathBuf]) -> Prometheus {
        let binary = prometheus_binary();
        let dir = tempfile::Builder::new().prefix("chat-prometheus-").tempdir().expect("temp dir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(&config, prometheus_config(targets, rule_files)).expect("write prometheus.yml");
        let http = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().expect("HTTP client");
        // The port is picked by binding :0 and letting go; another process may take it in
        // between, so a start that fails on the address is retried on a fresh port.
        let log_path = dir.path().join("prometheus.log");
        for _ in 0..3 {
            let port = crate::free_port();
            let log = std::fs::File::create(&log_path).expect("create prometheus.log");
            let mut child = std::process::Command::new(&binary)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {binary}: {e}"));
            match crate::wait_answering(&mut child, &format!("http://127.0.0.1:{port}/-/ready"), &log_path).await {
                Ok(()) => return Prometheus { child, port, dir, http },
                Err(log) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    if !log.contains("address already in use") {
                        panic!("prometheus did not become ready: {log}");
                    }
                }
            }
        }
        panic!("prometheus found no free port in three attempts");
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Evaluates an instant PromQL query now: each series of the resulting vector as its labels
    /// and value (a scalar result is one series without labels). Panics on a query error.
    pub async fn query(&self, promql: &str) -> Vec<(serde_json::Value, f64)> {
        let body = self.api("api/v1/query", &[("query", promql)]).await;
        let data = &body["data"];
        let sample = |s: &serde_json::Value| s.as_str().and_then(|v| v.parse::<f64>().ok()).unwrap_or(f64::NAN);
        match data["resultType"].as_str() {
            Some("vector") => data["result"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|series| (series["metric"].clone(), sample(&series["value"][1])))
                .collect(),
            Some("scalar") => vec![(serde_json::Value::Null, sample(&data["result"][1]))],
            other => panic!("query {promql} returned {other:?}, not a vector or scalar: {body}"),
        }
    }

    /// The loaded rule groups (`/api/v1/rules`, its `data.groups`).
    pub async fn rule_groups(&self) -> Vec<serde_json::Value> {
        let body = self.api("api/v1/rules", &[]).await;
        body["data"]["groups"].as_array().cloned().unwrap_or_default()
    }

    /// Prometheus's own log so far (for assertion messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    async fn api(&self, path: &str, params: &[(&str, &str)]) -> serde_json::Value {
        let url = format!("{}/{path}", self.url());
        let response = self.http.get(&url).query(params).send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let body: serde_json::Value =
            response.json().await.unwrap_or_else(|e| panic!("GET {url}: body is not JSON: {e}"));
        if body["status"] != "success" {
            panic!("GET {url} {params:?} failed: {body}");
        }
        body
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // Wait for the exit so the temp dir is not removed under a running TSDB.
        self.stop();
    }
}

fn prometheus_config(targets: &[String], rule_files: &[PathBuf]) -> String {
    let quoted = |items: Vec<String>| items.iter().map(|s| format!("\"{s}\"")).collect::<Vec<_>>().join(", ");
    let rules = quoted(rule_files.iter().map(|p| p.display().to_string()).collect());
    format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nrule_files: [{rules}]\nscrape_configs:\n  - job_name: chat\n    metrics_path: /metrics\n    static_configs:\n      - targets: [{}]\n",
        quoted(targets.to_vec())
    )
}
