//! The `loadgen` binary: parses flags, runs, prints the summary, writes the report files, and
//! exits 0 when the audit passed, 1 when it found a fault, 2 when the run could not be carried
//! out, 64 on a bad configuration. `loadgen capacity ...` is handed to [`loadgen::capacity::main`],
//! `loadgen compare ...` to [`loadgen::compare::main`].

use std::io::IsTerminal;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use loadgen::Cli;

fn main() -> ExitCode {
    // `loadgen capacity ...` has its own subcommands; everything else is a load run.
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("capacity") => return ExitCode::from(loadgen::capacity::main(args[1..].to_vec())),
        Some("compare") => return ExitCode::from(loadgen::compare::main(args[1..].to_vec())),
        _ => {}
    }
    match real_main() {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn real_main() -> anyhow::Result<u8> {
    let cli = Cli::parse();
    if let Some(n) = cli.bench_audit {
        let r = loadgen::bench::bench_audit(n);
        println!(
            "audit benchmark: {} deliveries in {:.3} CPU s ({:.3} wall s): {:.0} ns per delivery = {:.3} cores per 100k deliveries/s; findings {}",
            r.deliveries, r.cpu_seconds, r.wall_seconds, r.ns_per_delivery, r.cores_per_100k_deliveries_per_s, r.findings
        );
        return Ok(0);
    }
    let (report_path, html_path) = (cli.report.clone(), cli.html.clone());
    let config = match cli.into_config(std::io::stderr().is_terminal()) {
        Ok(c) => c,
        Err(errors) => {
            for e in errors {
                eprintln!("loadgen: {e}");
            }
            eprintln!("loadgen: see `loadgen --help`");
            return Ok(64);
        }
    };
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the tokio runtime")?;
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let report = match runtime.block_on(loadgen::run_until(config, ctrl_c)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("loadgen: {e}");
            return Ok(2);
        }
    };
    print!("{}", report.summary());
    if let Some(path) = &report_path {
        report.write_json(path).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("loadgen: wrote {}", path.display());
    }
    if let Some(path) = &html_path {
        report.write_html(path).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("loadgen: wrote {}", path.display());
    }
    // Let client tasks that are still closing end with the runtime, without waiting for them.
    runtime.shutdown_background();
    Ok(report.exit_code() as u8)
}
