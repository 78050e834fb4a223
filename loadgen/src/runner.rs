//! One run from start to verdict: plan, ramp, open-loop schedule, drain, stop, audit, report.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc;

use crate::audit::{finalize, Records, Track, TrackProgress};
use crate::centrifugo;
use crate::client::{run_client, ClientOutcome, ClientState, Cmd, Ready, Target};
use crate::config::{Config, ConfigError, Protocol};
use crate::metrics::{process_cpu_seconds, Clock, Collector, Metrics};
use crate::plan::Plan;
use crate::progress::Progress;
use crate::report::{Report, RunFacts};
use crate::schedule::{build_drops, build_history, build_sends, Action, Event};

/// A run that could not be carried out (as opposed to one whose audit failed).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// The configuration is invalid; every problem is listed.
    #[error("invalid configuration: {}", list(.0))]
    Config(Vec<ConfigError>),
    /// A gateway host name did not resolve.
    #[error("cannot resolve {url}: {reason}; check --url")]
    Resolve {
        /// The URL.
        url: String,
        /// The resolver's answer.
        reason: String,
    },
    /// Not one client connected and joined its rooms.
    #[error("no client could connect and join (errors: {errors}); is the gateway at {url} up?")]
    NoClients {
        /// The first URL.
        url: String,
        /// Errors by code.
        errors: String,
    },
}

fn list(errors: &[ConfigError]) -> String {
    errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// State shared by the run and every client task.
#[derive(Debug)]
pub struct Shared {
    /// The run's configuration.
    pub config: Config,
    /// The run clock.
    pub clock: Clock,
    /// Who is in which room.
    pub plan: Plan,
    /// One record per scheduled send.
    pub records: Records,
    /// Histograms and counters.
    pub metrics: Metrics,
    /// Gateways and their resolved addresses.
    pub targets: Vec<(Target, Vec<SocketAddr>)>,
    /// Random ASCII letters that bodies are sliced from.
    pub body_pool: String,
    /// `--protocol centrifugo`: the synthetic seq of each room's next ack.
    pub ack_ordinals: crate::centrifugo::AckOrdinals,
}

impl Shared {
    /// Everything a run needs before any connection: plan, schedule, records. Public so the
    /// audit benchmark can build the same state without a server.
    pub fn prepare(config: Config, targets: Vec<(Target, Vec<SocketAddr>)>) -> (Self, Vec<Event>) {
        let mut rng = StdRng::seed_from_u64(config.seed);
        let (plan, sends, mut events) = match &config.replay {
            // A replay: the recording's users, rooms and sends; nothing else is scheduled.
            Some(recording) => (recording.plan(&config.prefix), recording.schedule(config.replay_speed), Vec::new()),
            None => {
                let mut plan = Plan::build(
                    &config.prefix,
                    config.clients,
                    config.rooms,
                    config.rooms_per_client,
                    config.room_dist,
                    &mut rng,
                );
                if let Some(rooms) = &config.room_prefix {
                    plan.name_rooms(rooms);
                }
                let sends = build_sends(&config.phases, &plan, &mut rng);
                let total = config.measure_duration();
                let mut events = build_history(config.history_rate, total, &plan, &mut rng);
                if let Some(r) = &config.reconnect {
                    events.extend(build_drops(r, config.clients, total, &mut rng));
                }
                (plan, sends, events)
            }
        };
        events.sort_by_key(|e| e.at_us);
        let records = Records::new(&sends, plan.rooms.len());
        let pool_len = (config.body.max * 2).max(16 * 1024);
        let body_pool = (0..pool_len).map(|_| rng.random_range(b'a'..=b'z') as char).collect();
        let shards = std::thread::available_parallelism().map_or(4, |n| n.get() * 4);
        let ack_ordinals = crate::centrifugo::AckOrdinals::new(plan.rooms.len());
        let shared = Self {
            config,
            clock: Clock::new(),
            plan,
            records,
            metrics: Metrics::new(shards),
            targets,
            body_pool,
            ack_ordinals,
        };
        (shared, events)
    }
}

/// Runs the configured load and audit to the end. See [`run_until`].
pub async fn run(config: Config) -> Result<Report, RunError> {
    run_until(config, std::future::pending()).await
}

/// Runs the configured load and audit; `shutdown` completing (e.g. Ctrl-C) ends the schedule
/// early, after which the run drains, audits and reports as usual.
pub async fn run_until(config: Config, shutdown: impl Future<Output = ()>) -> Result<Report, RunError> {
    config.validate().map_err(RunError::Config)?;
    let started_unix_ms = protocol::now_ms();
    let mut targets = Vec::new();
    for url in &config.urls {
        let target = Target::parse(url).map_err(|reason| RunError::Resolve { url: url.clone(), reason })?;
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((target.host.as_str(), target.port))
            .await
            .map_err(|e| RunError::Resolve { url: url.clone(), reason: e.to_string() })?
            .collect();
        if addrs.is_empty() {
            return Err(RunError::Resolve { url: url.clone(), reason: "no address".into() });
        }
        targets.push((target, addrs));
    }
    let (shared, events) = Shared::prepare(config, targets);
    let shared = Arc::new(shared);
    let cfg = &shared.config;
    let cpu_start = process_cpu_seconds();
    tokio::pin!(shutdown);
    let mut interrupted = false;

    // Once a second: collect the shard windows, print the progress line.
    let collector = Arc::new(Mutex::new(Collector::new()));
    let progress = Progress::new(cfg.progress, shared.records.len() as u64);
    let ticker = {
        let (shared, collector, progress) = (shared.clone(), collector.clone(), progress.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let t = shared.clock.now_us() as f64 / 1e6;
                let mut c = collector.lock().unwrap_or_else(|p| p.into_inner());
                c.collect(&shared.metrics, t);
                progress.print(&shared, &c);
            }
        })
    };

    // === ramp ===
    let n = cfg.clients as usize;
    let (ready_tx, mut ready_rx) = mpsc::channel::<Ready>(n);
    let mut cmd_txs = Vec::with_capacity(n);
    let mut handles = Vec::with_capacity(n);
    let mut progresses: Vec<(u32, Arc<TrackProgress>)> = Vec::new();
    let ramp_start = shared.clock.now_us();
    let (mut ok, mut failed) = (0usize, 0usize);
    for i in 0..cfg.clients {
        let (tx, rx) = mpsc::channel(cfg.queue);
        cmd_txs.push(tx);
        let handle = match cfg.protocol {
            Protocol::Chat => {
                let st = ClientState::new(shared.clone(), i);
                progresses.extend(st.tracks().iter().map(|t| (t.room, t.progress())));
                tokio::spawn(run_client(st, rx, ready_tx.clone()))
            }
            Protocol::Centrifugo => {
                let st = centrifugo::Client::new(shared.clone(), i);
                progresses.extend(st.progress());
                tokio::spawn(centrifugo::run_client(st, rx, ready_tx.clone()))
            }
        };
        handles.push(handle);
        if cfg.ramp > 0.0 {
            let due = ramp_start + ((i + 1) as f64 * 1e6 / cfg.ramp) as u64;
            let sleep = tokio::time::sleep_until(shared.clock.instant(due).into());
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    Some(r) = ready_rx.recv() => if r.ok { ok += 1 } else { failed += 1 },
                    _ = &mut shutdown, if !interrupted => interrupted = true,
                }
            }
        }
        if interrupted {
            break;
        }
    }
    drop(ready_tx);
    let spawned = handles.len();
    let ramp_deadline = tokio::time::Instant::now() + cfg.connect_timeout * 3 + Duration::from_secs(15);
    while ok + failed < spawned && !interrupted {
        tokio::select! {
            r = ready_rx.recv() => match r {
                Some(r) => if r.ok { ok += 1 } else { failed += 1 },
                None => break,
            },
            _ = tokio::time::sleep_until(ramp_deadline) => break,
            _ = &mut shutdown => interrupted = true,
        }
    }
    let measure_start = shared.clock.now_us();
    shared.records.set_measure_start(measure_start);
    let cpu_measure_start = process_cpu_seconds();

    if ok == 0 {
        drop(stop_clients(&shared, cmd_txs, handles).await);
        ticker.abort();
        progress.finish();
        let errors = shared.metrics.errors();
        return Err(RunError::NoClients {
            url: cfg.urls.first().cloned().unwrap_or_default(),
            errors: format!("{errors:?}"),
        });
    }

    // === measured phase: the open-loop schedule ===
    let mut next_event = 0usize;
    let sends = shared.records.len();
    let mut next_send = 0usize;
    while !interrupted && (next_send < sends || next_event < events.len()) {
        let send_at = shared.records.get(next_send as u32).map(|r| r.sched_us);
        let event_at = events.get(next_event).map(|e| e.at_us);
        let (at, is_send) = match (send_at, event_at) {
            (Some(s), Some(e)) if e < s => (e, false),
            (Some(s), _) => (s, true),
            (None, Some(e)) => (e, false),
            (None, None) => break,
        };
        let due = measure_start + at;
        if shared.clock.now_us() + 500 < due {
            tokio::select! {
                _ = tokio::time::sleep_until(shared.clock.instant(due).into()) => {}
                _ = &mut shutdown => { interrupted = true; continue; }
            }
        }
        let (client, action) = if is_send {
            let rec = shared.records.get(next_send as u32);
            next_send += 1;
            match rec {
                Some(r) => (r.sender, Action::Send(next_send as u32 - 1)),
                None => continue,
            }
        } else {
            let e = events[next_event];
            next_event += 1;
            (e.client, e.action)
        };
        if let Some(tx) = cmd_txs.get(client as usize) {
            if tx.try_send(Cmd::Act(action)).is_err() && is_send {
                shared.metrics.error(client, "loadgen_backlog");
            }
        }
    }
    // The measured phase lasts its full length even when the schedule ends early (an idle
    // phase at rate 0 is how connection memory is measured).
    let phase_end = measure_start + cfg.measure_duration().as_micros() as u64;
    if !interrupted && shared.clock.now_us() < phase_end {
        tokio::select! {
            _ = tokio::time::sleep_until(shared.clock.instant(phase_end).into()) => {}
            _ = &mut shutdown => interrupted = true,
        }
    }
    let measure_end = shared.clock.now_us();

    // === drain: until every send is answered and every joined member has caught up ===
    let drain_deadline = tokio::time::Instant::now() + cfg.drain;
    loop {
        if drained(&shared, &progresses, &cmd_txs) {
            // Room for a late duplicate to show itself, then make sure nothing was written
            // meanwhile.
            tokio::time::sleep(Duration::from_millis(100)).await;
            if drained(&shared, &progresses, &cmd_txs) {
                break;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            _ = tokio::time::sleep_until(drain_deadline) => break,
            _ = &mut shutdown, if !interrupted => { interrupted = true; break; }
        }
    }
    let drain_end = shared.clock.now_us();

    // === stop and audit ===
    let outcomes = stop_clients(&shared, cmd_txs, handles).await;
    ticker.abort();
    let cpu_end = process_cpu_seconds();
    let mut collector = match Arc::try_unwrap(collector) {
        Ok(m) => m.into_inner().unwrap_or_else(|p| p.into_inner()),
        Err(shared_c) => std::mem::take(&mut *shared_c.lock().unwrap_or_else(|p| p.into_inner())),
    };
    collector.collect(&shared.metrics, shared.clock.now_us() as f64 / 1e6);
    progress.finish();
    let stray = shared.metrics.stray.load(Ordering::Relaxed);
    let audit = match cfg.protocol {
        Protocol::Chat => {
            let refs: Vec<&Track> = outcomes.iter().flat_map(|o| &o.tracks).collect();
            finalize(&shared.records, &refs, &shared.plan, stray, cfg.max_findings)
        }
        Protocol::Centrifugo => {
            let members: Vec<centrifugo::Member> = outcomes.into_iter().flat_map(|o| o.centrifugo).collect();
            centrifugo::finalize(&shared.records, &members, &shared.plan, stray, cfg.max_findings)
        }
    };
    let facts = RunFacts {
        started_unix_ms,
        ramp_start_us: ramp_start,
        measure_start_us: measure_start,
        measure_end_us: measure_end,
        drain_end_us: drain_end,
        clients_ok: ok as u64,
        clients_failed: (cfg.clients as usize - ok) as u64,
        interrupted,
        cpu_seconds: match (cpu_start, cpu_end) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        },
        cpu_seconds_measured: match (cpu_measure_start, cpu_end) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        },
    };
    let mut report = Report::build(&shared, &collector, audit, facts);
    if cfg.journeys > 0 {
        report.samples.hops = crate::journeys::sample(&shared, cfg.journeys, cfg.admin_token.as_deref()).await;
    }
    Ok(report)
}

/// Every written send answered, no client reconnecting, no command waiting for its client (a
/// send dispatched by the schedule but not yet written by a client starved of CPU would
/// otherwise be written after the drain and never answered), and every member caught up.
fn drained(shared: &Shared, progresses: &[(u32, Arc<TrackProgress>)], cmd_txs: &[mpsc::Sender<Cmd>]) -> bool {
    let r = &shared.records;
    if r.answered_count() < r.sent_count() || shared.metrics.reconnecting.load(Ordering::Relaxed) > 0 {
        return false;
    }
    if cmd_txs.iter().any(|tx| !tx.is_closed() && tx.capacity() < tx.max_capacity()) {
        return false;
    }
    progresses.iter().all(|(room, p)| {
        !p.active.load(Ordering::Acquire)
            || (p.last.load(Ordering::Relaxed) >= r.room_max_acked(*room) && p.holes.load(Ordering::Relaxed) == 0)
    })
}

/// Tells every client to stop and collects their outcomes; a client that does not finish within
/// five seconds is aborted and its tracks are lost (counted as not audited).
async fn stop_clients(
    shared: &Shared,
    cmd_txs: Vec<mpsc::Sender<Cmd>>,
    handles: Vec<tokio::task::JoinHandle<ClientOutcome>>,
) -> Vec<ClientOutcome> {
    for tx in cmd_txs {
        // When the queue is full the Stop is lost, but dropping the sender closes the channel,
        // which the client also takes as a stop once it has worked through the queue.
        let _ = tx.try_send(Cmd::Stop);
    }
    let deadline = tokio::time::Instant::now() + stop_grace(handles.len());
    let mut outcomes = Vec::new();
    for (i, mut h) in handles.into_iter().enumerate() {
        match tokio::time::timeout_at(deadline, &mut h).await {
            Ok(Ok(outcome)) => outcomes.push(outcome),
            Ok(Err(_)) => shared.metrics.error(i as u32, "client_panicked"),
            Err(_) => {
                // Its memberships are left out of the audit (counted as excluded), and said so.
                h.abort();
                shared.metrics.error(i as u32, "stop_timeout");
            }
        }
    }
    outcomes
}

/// How long stopping `clients` clients may take: each closes its socket and hands its tracks
/// over, which on a loaded machine (tens of thousands of clients, every core busy) takes more
/// than the 5 s that suit a small run.
fn stop_grace(clients: usize) -> Duration {
    Duration::from_secs(5) + Duration::from_millis(clients as u64)
}
