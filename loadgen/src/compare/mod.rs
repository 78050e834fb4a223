//! `loadgen compare A.json B.json`: is run B (a candidate build) worse than run A (the
//! baseline)? Two `--report` files are compared figure by figure — end-to-end and per-hop latency
//! distributions, throughput, loss and duplicates — each with a 95% interval of the change and a
//! test; the exit status is 0 when nothing regressed, 1 when something did (named, with the hop
//! it happened at), 2 on a usage error or a file that cannot be read. A regression gate for CI.
//!
//! - `input`: the parts of a report a comparison reads (old reports without samples load);
//! - `stats`: Mann-Whitney U, the quantile test, bootstrap intervals, rate and proportion tests,
//!   Holm's adjustment;
//! - `model`: the rows, the rules and the verdicts ([`Comparison`]);
//! - `text` / `html`: the table on stdout and the page with both distributions plotted.

pub mod html;
pub mod input;
pub mod model;
pub mod stats;
pub mod text;

use std::path::PathBuf;

use clap::Parser;

pub use input::{InputError, Run};
pub use model::{Comparison, Options, Row, Section, Verdict};

/// `loadgen compare`.
#[derive(Debug, Parser)]
#[command(
    name = "loadgen compare",
    about = "Compare two runs' reports: exit 0 when B is not significantly worse than A, 1 when it is.",
    long_about = "Compare two runs' --report files, A the baseline and B the candidate: end-to-end and per-hop \
        latency distributions (from the reports' samples), throughput, loss and duplicates, each with a 95% \
        interval of the change (bootstrap) and a test (Mann-Whitney U for medians, a quantile test for p99, \
        Poisson rates, Fisher's exact test for counts), Holm-adjusted over all figures. A figure regresses \
        when it is significantly worse by more than --threshold (latencies: and by more than --floor-ms); \
        any loss or duplicate where A had none is a regression. Exits 0 when nothing regressed, 1 when \
        something did (named, with the hop where one is), 2 on a usage error or an unreadable report.",
    after_help = "Examples:\n  \
        loadgen --seed 1 --prefix base --report a.json && loadgen --seed 1 --prefix cand --report b.json\n  \
        loadgen compare a.json b.json\n  \
        loadgen compare a.json b.json --threshold 20 --floor-ms 1 --html compare.html"
)]
pub struct CompareCli {
    /// The baseline run's report (`loadgen --report A.json`).
    pub a: PathBuf,
    /// The candidate run's report.
    pub b: PathBuf,
    /// Smallest relative change that counts as a regression, in percent. Example: --threshold 20
    #[arg(long, value_parser = parse_percent, default_value = "10")]
    pub threshold: f64,
    /// Smallest latency change that counts, in ms (below it a change never fails, however
    /// significant). Example: --floor-ms 1
    #[arg(long, default_value_t = 0.5)]
    pub floor_ms: f64,
    /// Significance level over all figures together (Holm). Example: --alpha 0.05
    #[arg(long, default_value_t = 0.01)]
    pub alpha: f64,
    /// Bootstrap resamples for the intervals. Example: --resamples 5000
    #[arg(long, default_value_t = 1000)]
    pub resamples: usize,
    /// Seed of the bootstrap (the same files and seed give the same output). Example: --seed 7
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Fewer samples than this on either side: the figure is shown but not tested.
    /// Example: --min-samples 50
    #[arg(long, default_value_t = 20)]
    pub min_samples: usize,
    /// Write an HTML page plotting both runs' distributions. Example: --html compare.html
    #[arg(long)]
    pub html: Option<PathBuf>,
}

/// `10`, `10%` or `12.5` (percent) as a fraction.
fn parse_percent(text: &str) -> Result<f64, String> {
    let n: f64 =
        text.trim().trim_end_matches('%').parse().map_err(|_| format!("`{text}`: a percentage such as 10 or 10%"))?;
    if n.is_finite() && n >= 0.0 {
        Ok(n / 100.0)
    } else {
        Err(format!("`{text}`: must be 0 or more"))
    }
}

impl CompareCli {
    /// The options of the comparison, checked.
    pub fn options(&self) -> Result<Options, String> {
        if !(self.alpha > 0.0 && self.alpha < 1.0) {
            return Err(format!("--alpha {} must be between 0 and 1", self.alpha));
        }
        if !(self.floor_ms.is_finite() && self.floor_ms >= 0.0) {
            return Err(format!("--floor-ms {} must be 0 or more", self.floor_ms));
        }
        if self.resamples == 0 {
            return Err("--resamples must be at least 1".into());
        }
        Ok(Options {
            threshold: self.threshold,
            floor_ms: self.floor_ms,
            alpha: self.alpha,
            resamples: self.resamples,
            seed: self.seed,
            min_samples: self.min_samples.max(2),
        })
    }
}

/// `loadgen compare ...` (`args[0]` is `compare`): the exit status, 0 / 1 / 2.
pub fn main(args: Vec<String>) -> u8 {
    let cli = match CompareCli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    let options = match cli.options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("loadgen compare: {e}");
            return 2;
        }
    };
    let (a, b) = match (Run::read(&cli.a), Run::read(&cli.b)) {
        (Ok(a), Ok(b)) => (a, b),
        (a, b) => {
            for e in [a.err(), b.err()].into_iter().flatten() {
                eprintln!("loadgen compare: {e}");
            }
            return 2;
        }
    };
    let comparison = Comparison::build(&a, &b, &options);
    print!("{}", comparison.text());
    if let Some(path) = &cli.html {
        if let Err(e) = comparison.write_html(path) {
            eprintln!("loadgen compare: writing {}: {e}", path.display());
            return 2;
        }
        eprintln!("loadgen compare: wrote {}", path.display());
    }
    comparison.exit_code()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_and_usage_errors() {
        let cli = CompareCli::try_parse_from(["compare", "a.json", "b.json", "--threshold", "20%"]).unwrap();
        assert_eq!(cli.threshold, 0.2);
        assert_eq!(cli.options().unwrap().floor_ms, 0.5);
        assert_eq!(CompareCli::try_parse_from(["compare", "a.json"]).map(|_| ()).unwrap_err().exit_code(), 2);
        assert!(parse_percent("ten").is_err() && parse_percent("-1").is_err());
        let bad = CompareCli::try_parse_from(["compare", "a", "b", "--alpha", "2"]).unwrap();
        assert!(bad.options().is_err());
        assert_eq!(main(vec!["compare".into(), "/nonexistent/a.json".into(), "/nonexistent/b.json".into()]), 2);
        assert_eq!(main(vec!["compare".into()]), 2);
    }

    #[test]
    fn every_flag_has_an_example() {
        use clap::CommandFactory;
        for arg in CompareCli::command().get_arguments() {
            let id = arg.get_id().as_str();
            if matches!(id, "help" | "version" | "a" | "b") {
                continue;
            }
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            assert!(help.contains("Example:"), "--{id} has no example: {help}");
        }
    }
}
