//! `chat replay worker LOG`: runs the sequencer again on a fanout worker's decision log
//! ([`fanout::replay`]), prints each decision and whether they are the logged ones.

use std::path::Path;

use fanout::replay::{replay, Log};

/// Exit status: the replay decided exactly as logged.
pub const IDENTICAL: i32 = 0;
/// Exit status: a decision (or a store call, clock reading or id) differed from the log.
pub const DIVERGED: i32 = 1;
/// Exit status: the log cannot be read, or is incomplete.
pub const BAD_LOG: i32 = 2;

/// Replays the log at `path`, printing the account on stdout (problems with the log on
/// stderr); returns the exit status.
pub async fn worker(path: &Path, verbose: bool) -> i32 {
    let log = match Log::read(path) {
        Ok(log) => log,
        Err(e) => {
            eprintln!("chat replay worker: {}: {e}", path.display());
            return BAD_LOG;
        }
    };
    let report = replay(&log).await;
    print!("{}", report.render(verbose));
    if report.identical() {
        IDENTICAL
    } else {
        DIVERGED
    }
}
