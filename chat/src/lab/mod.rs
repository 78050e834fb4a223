//! `chat lab`: the debugging lab. A round starts the processes a challenge needs, drives
//! background traffic, plants one hidden cause drawn from the seed ([`catalog`]), and prints only
//! the symptom and where to look. Players answer with what they found; answers are graded and
//! kept on a scoreboard ([`round`]). `reveal` tells the cause and its evidence; `stop` tears
//! everything down ([`topology`]).

pub mod catalog;
pub mod round;
pub mod topology;

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use catalog::{Challenge, Field, CHALLENGES};
use round::{grade, LabDir, Round, Score, Verdict};
use topology::Launch;

/// Exit status of a correct answer (and of every command that succeeded).
pub const EXIT_CORRECT: i32 = 0;
/// Exit status of an answer that is wrong or only partly right.
pub const EXIT_WRONG: i32 = 1;
/// Exit status of a usage error: an unknown challenge, a missing field, no round running.
pub const EXIT_USAGE: i32 = 2;

/// Where the lab keeps its round and scoreboard.
#[derive(Args, Debug, Clone)]
pub struct LabArgs {
    /// The lab's directory: the round in progress, its logs and data, the scoreboard.
    #[arg(long, env = "CHAT_LAB_DIR", value_name = "DIR", default_value = "target/chat-lab", global = true)]
    pub dir: PathBuf,
}

/// `chat lab` commands.
#[derive(Subcommand, Debug)]
pub enum LabCommand {
    /// Every challenge with its symptom.
    List,
    /// Start a round: the processes, background traffic and one hidden cause.
    Start {
        /// The challenge (see `chat lab list`).
        challenge: String,
        /// Seed of the cause: teams given the same seed play the same round (default: random).
        #[arg(long)]
        seed: Option<u64>,
        /// The team playing, for the scoreboard.
        #[arg(long, default_value = "solo")]
        team: String,
        /// Port of the first process; a round with several uses the ports after it.
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// The loadgen binary (default: the one beside chat).
        #[arg(long, value_name = "FILE")]
        loadgen: Option<PathBuf>,
        /// OTLP/HTTP endpoint the round's processes export spans to (Jaeger: http://127.0.0.1:4318).
        #[arg(long, value_name = "URL")]
        otlp_endpoint: Option<String>,
    },
    /// Answer: which process, hop, kind (and room) — the fields the challenge's page asks for.
    /// Exit status 0 when correct, 1 when wrong or partly right.
    Answer {
        /// The challenge being answered.
        challenge: String,
        /// The process at fault (its id, as in journeys).
        #[arg(long)]
        process: Option<String>,
        /// The hop where it goes wrong (`gateway.deliver`, `fanout.publish`, ...).
        #[arg(long)]
        hop: Option<String>,
        /// The mechanism (`drop`, `delay`, ...).
        #[arg(long)]
        kind: Option<String>,
        /// The room it strikes.
        #[arg(long)]
        room: Option<String>,
    },
    /// Print the planted cause and the evidence that proves it.
    Reveal,
    /// The scoreboard, one row per team and round.
    Scoreboard,
    /// Stop every process of the round.
    Stop,
}

/// Runs a lab command; returns the exit status.
pub async fn main(args: LabArgs, command: LabCommand) -> i32 {
    let dir = LabDir::new(args.dir);
    let result = match command {
        LabCommand::List => Ok(list()),
        LabCommand::Start { challenge, seed, team, port, loadgen, otlp_endpoint } => {
            start(&dir, &challenge, seed, team, port, loadgen, otlp_endpoint).await
        }
        LabCommand::Answer { challenge, process, hop, kind, room } => {
            let given = [(Field::Process, process), (Field::Hop, hop), (Field::Kind, kind), (Field::Room, room)];
            answer(&dir, &challenge, &given)
        }
        LabCommand::Reveal => reveal(&dir),
        LabCommand::Scoreboard => dir.scores().map(|scores| {
            print!("{}", round::scoreboard_table(&scores));
            EXIT_CORRECT
        }),
        LabCommand::Stop => stop(&dir).await,
    };
    result.unwrap_or_else(|e| {
        eprintln!("chat lab: {e:#}");
        EXIT_WRONG
    })
}

fn usage(message: impl std::fmt::Display) -> anyhow::Result<i32> {
    eprintln!("chat lab: {message}");
    Ok(EXIT_USAGE)
}

fn list() -> i32 {
    for challenge in CHALLENGES {
        println!("{:<24} {}", challenge.name, challenge.symptom);
    }
    EXIT_CORRECT
}

fn find(name: &str) -> Option<&'static Challenge> {
    catalog::challenge(name)
}

async fn start(
    dir: &LabDir,
    name: &str,
    seed: Option<u64>,
    team: String,
    port: u16,
    loadgen: Option<PathBuf>,
    otlp_endpoint: Option<String>,
) -> anyhow::Result<i32> {
    let Some(challenge) = find(name) else {
        return usage(format!("no challenge {name}; there are {}", catalog::names()));
    };
    if let Some(round) = dir.round()? {
        return usage(format!("a round of {} is running; `chat lab stop` first", round.challenge));
    }
    let (chat, loadgen) = Launch::binaries(loadgen)?;
    let seed = seed.unwrap_or_else(rand::random);
    let planted = challenge.draw(seed);
    let round_dir = dir.root().join("round");
    if round_dir.exists() {
        std::fs::remove_dir_all(&round_dir).with_context(|| format!("clearing {}", round_dir.display()))?;
    }
    let launch = Launch {
        chat,
        loadgen,
        base_port: port,
        dir: round_dir.clone(),
        admin_token: uuid::Uuid::new_v4().simple().to_string(),
        otlp_endpoint,
    };
    let (mut processes, urls) = launch.start_chat(challenge.topology)?;
    let cluster_dir = (challenge.topology == catalog::Topology::Cluster).then(|| launch.cluster_dir());
    let mut round = Round {
        challenge: challenge.name.to_owned(),
        seed,
        team,
        started_ms: now_ms(),
        attempts: 0,
        revealed: false,
        planted,
        urls: urls.clone(),
        admin_token: launch.admin_token.clone(),
        processes: processes.clone(),
        cluster_dir: cluster_dir.clone(),
    };
    // Saved at once, so `stop` finds the processes even if what follows fails.
    dir.save(&round)?;
    let prepared = async {
        topology::wait_ready(&urls, &processes).await?;
        topology::plant(&round.planted.plants, &urls, &launch.admin_token).await?;
        launch.start_traffic(&urls, seed)
    };
    match prepared.await {
        Ok(traffic) if challenge.restarts_bus => {
            processes.extend(traffic);
            // The story's maintenance: once the traffic flows, NATS restarts. The gateways must
            // follow the rooms by then, or a planted `gateway.resubscribe` finds nothing to drop.
            let restarted = async {
                topology::wait_traffic(&urls).await?;
                tokio::time::sleep(std::time::Duration::from_secs(2)).await;
                let dir = cluster_dir.as_deref().context("only a cluster has a bus to restart")?;
                let cluster = topology::restart_bus(dir).await?;
                topology::wait_ready(&urls, &cluster).await?;
                anyhow::Ok(cluster)
            };
            match restarted.await {
                Ok(cluster) => {
                    processes.retain(|p| p.program == "loadgen");
                    processes.extend(cluster);
                }
                Err(e) => {
                    if let Some(dir) = &cluster_dir {
                        let _ = topology::stop_cluster(dir);
                    }
                    topology::stop(&processes).await;
                    dir.clear()?;
                    return Err(e.context("restarting NATS"));
                }
            }
        }
        Ok(traffic) => processes.extend(traffic),
        Err(e) => {
            if let Some(dir) = &cluster_dir {
                let _ = topology::stop_cluster(dir);
            }
            topology::stop(&processes).await;
            dir.clear()?;
            return Err(e);
        }
    }
    round.processes = processes;
    round.started_ms = now_ms();
    dir.save(&round)?;
    println!("{} (seed {seed}, team {})", challenge.name, round.team);
    println!();
    println!("{}", textwrap(challenge.story));
    println!();
    for (name, url) in &urls {
        println!(
            "{name:<10} {url}  (WebSocket {}/ws, metrics {url}/metrics, journeys {url}/debug/messages/ID)",
            url.replacen("http", "ws", 1)
        );
    }
    if cluster_dir.is_some() {
        println!(
            "bus        {}  (NATS monitoring: /connz?subs=1 lists each process's subscriptions)",
            topology::BUS_MONITOR
        );
    }
    match &cluster_dir {
        Some(dir) => println!(
            "logs       {}  (the cluster's processes; the round's traffic: {})",
            dir.join("logs").display(),
            round_dir.join("logs").display()
        ),
        None => println!("logs       {}", round_dir.join("logs").display()),
    }
    println!(
        "traffic    loadgen clients in rooms {p}-r0 .. {p}-r{} (join them with loadgen --room-prefix {p})",
        catalog::ROOMS - 1,
        p = catalog::PREFIX,
    );
    println!();
    let flags: Vec<&str> = challenge.asks.iter().map(|f| f.flag()).collect();
    println!(
        "answer     chat lab answer {} {}",
        challenge.name,
        flags.iter().map(|f| format!("{f} ...")).collect::<Vec<_>>().join(" ")
    );
    println!("page       {}", challenge.page);
    Ok(EXIT_CORRECT)
}

fn answer(dir: &LabDir, name: &str, given: &[(Field, Option<String>)]) -> anyhow::Result<i32> {
    let Some(challenge) = find(name) else {
        return usage(format!("no challenge {name}; there are {}", catalog::names()));
    };
    let Some(mut round) = dir.round()? else { return usage("no round is running; `chat lab start CHALLENGE` first") };
    if round.challenge != challenge.name {
        return usage(format!("the round running is {}, not {}", round.challenge, challenge.name));
    }
    let missing: Vec<&str> =
        challenge.asks.iter().filter(|f| given.iter().all(|(g, v)| g != *f || v.is_none())).map(|f| f.flag()).collect();
    if !missing.is_empty() {
        return usage(format!("{} asks for {} as well", challenge.name, missing.join(", ")));
    }
    let answer: Vec<(Field, String)> = given
        .iter()
        .filter(|(field, _)| challenge.asks.contains(field))
        .filter_map(|(field, value)| value.clone().map(|v| (*field, v)))
        .collect();
    let (verdict, right) = grade(&round.planted.cause, &answer);
    round.attempts += 1;
    dir.save(&round)?;
    let elapsed_secs = u64::try_from((now_ms() - round.started_ms) / 1000).unwrap_or(0);
    dir.record(&Score {
        team: round.team.clone(),
        challenge: round.challenge.clone(),
        seed: round.seed,
        verdict,
        attempt: round.attempts,
        elapsed_secs,
        after_reveal: round.revealed,
    })?;
    let right: Vec<&str> = right.iter().map(|f| f.flag()).collect();
    println!(
        "{}: {} of {} right{} after {}m{:02}s, attempt {}{}",
        verdict.name(),
        right.len(),
        answer.len(),
        if right.is_empty() || verdict == Verdict::Correct {
            String::new()
        } else {
            format!(" ({})", right.join(", "))
        },
        elapsed_secs / 60,
        elapsed_secs % 60,
        round.attempts,
        if round.revealed { " (after reveal: not scored)" } else { "" }
    );
    Ok(if verdict == Verdict::Correct { EXIT_CORRECT } else { EXIT_WRONG })
}

fn reveal(dir: &LabDir) -> anyhow::Result<i32> {
    let Some(mut round) = dir.round()? else { return usage("no round is running") };
    round.revealed = true;
    dir.save(&round)?;
    let planted = &round.planted;
    let cause = &planted.cause;
    println!("{} (seed {}): {}", round.challenge, round.seed, planted.variant);
    println!("process  {}", cause.process);
    println!("hop      {}", cause.hop);
    println!("kind     {}", cause.kind);
    if let Some(room) = &cause.room {
        println!("room     {room}");
    }
    println!();
    println!("evidence");
    println!("{}", textwrap(&planted.evidence));
    println!();
    println!("solution: docs/exercises/solutions/{}.md", planted.variant);
    println!();
    println!("planted (sealed faults, not listed by GET /admin/faults)");
    for plant in &planted.plants {
        println!("  {}: {}", plant.process, plant.fault);
    }
    Ok(EXIT_CORRECT)
}

async fn stop(dir: &LabDir) -> anyhow::Result<i32> {
    let Some(round) = dir.round()? else {
        println!("no round is running");
        return Ok(EXIT_CORRECT);
    };
    // Traffic first, so the servers' shutdown is not a storm of reconnects.
    let traffic: Vec<_> = round.processes.iter().filter(|p| p.program == "loadgen").cloned().collect();
    let mut killed = topology::stop(&traffic).await;
    if let Some(dir) = &round.cluster_dir {
        topology::stop_cluster(dir)?;
    }
    killed.extend(topology::stop(&round.processes).await);
    let left: Vec<&str> = round.processes.iter().filter(|p| topology::alive(p)).map(|p| p.name.as_str()).collect();
    if !left.is_empty() {
        anyhow::bail!("still running after SIGKILL: {}", left.join(", "));
    }
    dir.clear()?;
    let data = dir.root().join("round").join("data");
    if data.exists() {
        std::fs::remove_dir_all(&data).with_context(|| format!("removing {}", data.display()))?;
    }
    if killed.is_empty() {
        println!("stopped {} processes", round.processes.len());
    } else {
        println!(
            "stopped {} processes ({} killed after {:?}: {})",
            round.processes.len(),
            killed.len(),
            std::time::Duration::from_secs(10),
            killed.join(", ")
        );
    }
    Ok(EXIT_CORRECT)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Text filled to 96 columns (the stories are written as one long line).
fn textwrap(text: &str) -> String {
    textwrap::fill(text, 96)
}
