//! `chat debug waits --url ...`: what every process's operations wait on, gathered from each
//! `/debug/waits`, drawn as one wait-for graph, and its cycles (deadlocks) named.
//!
//! An operation that waits for a resource another operation holds (the names mean the same in
//! every process: `room-lock:R`, `room-sequencer:R`) is an edge from the first to the second; a
//! strongly connected set of more than one operation, or one that waits on itself, is a cycle.

use anyhow::Context;
use petgraph::graph::{DiGraph, NodeIndex};
use serde::Deserialize;
use telemetry::waits::Wait;

/// Exit status: no cycle.
pub const NO_CYCLE: i32 = 0;
/// Exit status: at least one cycle (a deadlock).
pub const CYCLE: i32 = 1;

/// One process's `/debug/waits`.
#[derive(Debug, Clone, Deserialize)]
pub struct ProcessWaits {
    /// The process's name.
    pub process: String,
    /// Its waits.
    pub waits: Vec<Wait>,
}

/// One operation of the graph: a wait of a process.
#[derive(Debug, Clone)]
pub struct Operation<'a> {
    /// The process.
    pub process: &'a str,
    /// The wait.
    pub wait: &'a Wait,
}

impl std::fmt::Display for Operation<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.process, self.wait.operation)
    }
}

/// Fetches every URL's `/debug/waits` (waits at least `min_ms` old).
pub async fn gather(urls: &[String], admin_token: Option<&str>, min_ms: u64) -> anyhow::Result<Vec<ProcessWaits>> {
    let client = reqwest::Client::new();
    let mut gathered = Vec::new();
    for base in urls {
        let url = format!("{}/debug/waits?min_ms={min_ms}", base.trim_end_matches('/'));
        let mut request = client.get(&url);
        if let Some(token) = admin_token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.with_context(|| format!("GET {url}"))?;
        let status = response.status();
        if !status.is_success() {
            anyhow::bail!("{url}: {status}: {}", response.text().await.unwrap_or_default());
        }
        gathered.push(response.json().await.with_context(|| format!("reading {url}"))?);
    }
    Ok(gathered)
}

/// The cycles of the wait-for graph of `processes`, each as its operations in wait order.
pub fn cycles(processes: &[ProcessWaits]) -> Vec<Vec<Operation<'_>>> {
    let mut graph: DiGraph<Operation<'_>, ()> = DiGraph::new();
    for process in processes {
        for wait in &process.waits {
            graph.add_node(Operation { process: &process.process, wait });
        }
    }
    let nodes: Vec<NodeIndex> = graph.node_indices().collect();
    for &waiter in &nodes {
        for &holder in &nodes {
            let holds = graph[holder].wait.holding.iter().any(|r| *r == graph[waiter].wait.waiting_for);
            if holds {
                graph.add_edge(waiter, holder, ());
            }
        }
    }
    petgraph::algo::tarjan_scc(&graph)
        .into_iter()
        .filter(|scc| scc.len() > 1 || graph.contains_edge(scc[0], scc[0]))
        .map(|scc| {
            // Walk the cycle from its first listed operation along edges inside it.
            let start = scc.iter().copied().min().unwrap_or(scc[0]);
            let mut order = vec![start];
            while order.len() < scc.len() {
                let Some(last) = order.last().copied() else { break };
                let next = graph.neighbors(last).find(|n| scc.contains(n) && !order.contains(n));
                match next {
                    Some(next) => order.push(next),
                    None => break,
                }
            }
            order.into_iter().map(|n| graph[n].clone()).collect()
        })
        .collect()
}

/// The table of every wait and the cycles found, as printed.
pub fn render(processes: &[ProcessWaits]) -> String {
    let mut out =
        format!("{:<12} {:>9}  {:<28} {:<44} {}\n", "process", "waited", "operation", "holding", "waiting for");
    let mut rows: Vec<(&str, &Wait)> =
        processes.iter().flat_map(|p| p.waits.iter().map(move |w| (p.process.as_str(), w))).collect();
    rows.sort_by_key(|(_, wait)| std::cmp::Reverse(wait.waited_ms));
    for (process, wait) in &rows {
        out.push_str(&format!(
            "{process:<12} {:>8.1}s  {:<28} {:<44} {}\n",
            wait.waited_ms as f64 / 1000.0,
            wait.operation,
            if wait.holding.is_empty() { "-".to_owned() } else { wait.holding.join(", ") },
            wait.waiting_for
        ));
    }
    if rows.is_empty() {
        out.push_str("(nothing waits)\n");
    }
    let found = cycles(processes);
    out.push('\n');
    if found.is_empty() {
        out.push_str("no cycle\n");
    }
    for cycle in &found {
        out.push_str("CYCLE (deadlock):\n");
        for (i, operation) in cycle.iter().enumerate() {
            let next = &cycle[(i + 1) % cycle.len()];
            out.push_str(&format!("  {operation}\n    waits for {} held by {next}\n", operation.wait.waiting_for));
        }
    }
    out
}

/// `chat debug waits`: prints the table and the cycles; returns the exit status.
pub async fn print(urls: &[String], admin_token: Option<&str>, min_ms: u64) -> anyhow::Result<i32> {
    let processes = gather(urls, admin_token, min_ms).await?;
    print!("{}", render(&processes));
    Ok(if cycles(&processes).is_empty() { NO_CYCLE } else { CYCLE })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait(operation: &str, holding: &[&str], waiting_for: &str) -> Wait {
        Wait {
            operation: operation.into(),
            holding: holding.iter().map(|r| r.to_string()).collect(),
            waiting_for: waiting_for.into(),
            since_unix_ms: 0,
            waited_ms: 1500,
        }
    }

    #[test]
    fn a_cycle_across_processes_is_found_and_a_chain_is_not() {
        let processes = vec![
            ProcessWaits {
                process: "fanout-1".into(),
                waits: vec![wait("sequence r1", &["room-lock:r1"], "room-lock:r2")],
            },
            ProcessWaits {
                process: "fanout-2".into(),
                waits: vec![wait("sequence r2", &["room-lock:r2"], "room-lock:r1")],
            },
            ProcessWaits {
                process: "gw-1".into(),
                waits: vec![wait("send r1 c-1", &[], "room-lock:r1"), wait("send r3 c-2", &[], "room-sequencer:r3")],
            },
        ];
        let found = cycles(&processes);
        assert_eq!(found.len(), 1);
        let names: Vec<String> = found[0].iter().map(ToString::to_string).collect();
        assert_eq!(names, ["fanout-1: sequence r1", "fanout-2: sequence r2"]);
        assert!(render(&processes).contains("CYCLE"));

        let chain = vec![ProcessWaits {
            process: "gw-1".into(),
            waits: vec![
                wait("send r1 c-1", &[], "room-sequencer:r1"),
                wait("sequence r1", &["room-sequencer:r1"], "store:append"),
            ],
        }];
        assert!(cycles(&chain).is_empty());
        assert!(render(&chain).contains("no cycle"));
    }
}
