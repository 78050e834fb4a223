//! `chat`: with no subcommand, the whole chat system in one process on embedded defaults;
//! `chat gateway` and `chat fanout` are the processes of a cluster on NATS and a CQL store.
//! The flags are in [`chat::cli`].

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use chat::cli::{Cli, Command, CommonArgs, DebugCommand, ReplayCommand};
use clap::{CommandFactory, Parser};
use storage::embedded::EmbeddedOptions;

/// mimalloc instead of glibc's allocator: a send allocates and frees many small buffers (frames,
/// messages, journal entries), and glibc's malloc and free took 18 % of a send's CPU
/// (docs/benchmarks.md). Built without transparent huge pages (its `no_thp` feature): asking the
/// kernel for 2 MiB pages cost about 0.65 KiB of resident memory per idle connection.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    runtime().context("start the async runtime")?.block_on(run(Cli::parse()))
}

/// The async runtime: with one worker thread (`TOKIO_WORKER_THREADS=1`, as the benchmarks pin a
/// server to one core), tokio's current-thread scheduler, which wakes a task without the
/// work-stealing scheduler's atomics and queue hand-offs; otherwise the multi-threaded one, one
/// worker per core (or `TOKIO_WORKER_THREADS`).
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    let one_worker = std::env::var("TOKIO_WORKER_THREADS").is_ok_and(|threads| threads.trim() == "1");
    let mut builder = if one_worker {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    builder.enable_all().build()
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        None => {
            let _telemetry = init_logging(&cli.common, "chat")?;
            let config = cli.gateway.config();
            tracing::info!(auth = config.jwt_secret.is_some(), admin = config.admin_token.is_some(), data_dir = %cli.data_dir.display(), "starting all-in-one chat");
            let listener = bind(cli.listen).await?;
            let decision_log = cli.decision_log.path.filter(|p| !p.as_os_str().is_empty());
            let capacity = cli.common.journal_capacity;
            chat::all_in_one_logged(
                listener,
                &cli.data_dir,
                EmbeddedOptions { commit_window: Duration::from_micros(cli.commit_window_us) },
                config,
                capacity,
                decision_log.as_deref(),
                shutdown_signal(),
            )
            .await
        }
        Some(Command::Gateway { listen, backends, gateway, common }) => {
            let _telemetry = init_logging(&common, "chat-gateway")?;
            let config = gateway.config();
            tracing::info!(gateway = %config.gateway_id, nats = %backends.nats_url, cql = ?backends.cql_nodes, "starting gateway");
            let backends = backends.backends()?;
            let listener = bind(listen).await?;
            chat::cluster::gateway(listener, backends, config, common.journal_capacity, shutdown_signal()).await
        }
        Some(Command::Fanout { listen, worker, backends, common }) => {
            let _telemetry = init_logging(&common, "chat-fanout")?;
            let admin_token = worker.admin_token.clone().filter(|t| !t.is_empty());
            let worker = worker.config(common.journal_capacity);
            tracing::info!(worker = %worker.id, nats = %backends.nats_url, cql = ?backends.cql_nodes, "starting fanout worker");
            let backends = backends.backends()?;
            let listener = bind(listen).await?;
            chat::cluster::fanout(listener, backends, worker, admin_token, shutdown_signal()).await
        }
        Some(Command::Trace { id, url, admin_token }) => chat::trace::print(&url, &id, admin_token.as_deref()).await,
        Some(Command::Replay { what: ReplayCommand::Worker { log, verbose } }) => {
            std::process::exit(chat::replay::worker(&log, verbose).await)
        }
        Some(Command::Debug { what: DebugCommand::Waits { url, admin_token, min_ms } }) => {
            match chat::waits::print(&url, admin_token.as_deref(), min_ms).await {
                Ok(code) => std::process::exit(code),
                Err(e) => {
                    eprintln!("chat debug waits: {e:#}");
                    std::process::exit(2)
                }
            }
        }
        Some(Command::Lab { args, command }) => std::process::exit(chat::lab::main(args, command).await),
        Some(Command::ConfigTable) => {
            print!("{}", chat::config_doc::markdown_table(&Cli::command()));
            Ok(())
        }
    }
}

fn init_logging(common: &CommonArgs, service: &str) -> anyhow::Result<telemetry::logging::TelemetryGuard> {
    telemetry::logging::init(common.log_format(), common.otlp_endpoint.as_deref(), service)
        .context("setting up tracing")
}

/// Binds and announces the address on stdout (scripts and tests wait for this line).
async fn bind(address: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(address).await.with_context(|| format!("binding {address}"))?;
    println!("chat listening on http://{}", listener.local_addr()?);
    Ok(listener)
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the server");
                let _ = interrupt.await;
                return;
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
    tracing::info!("shutdown signal received");
}
