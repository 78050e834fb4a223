//! A round's state on disk (`round.json` in the lab directory) and the scoreboard
//! (`scoreboard.jsonl`, one line per answer, kept across rounds).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::catalog::{Cause, Field, Planted};

/// A process the round started.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Started {
    /// Its name (a process id, or `loadgen-<process>`).
    pub name: String,
    /// Its pid.
    pub pid: u32,
    /// The program's file name, checked before signalling the pid (pids are reused).
    pub program: String,
}

/// A round in progress.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Round {
    /// The challenge.
    pub challenge: String,
    /// The seed the cause was drawn with.
    pub seed: u64,
    /// The team playing.
    pub team: String,
    /// When it started, Unix milliseconds.
    pub started_ms: i64,
    /// Answers given so far.
    pub attempts: u32,
    /// Whether `reveal` was run (later answers are not scored).
    pub revealed: bool,
    /// What was planted.
    pub planted: Planted,
    /// Each chat process's id and base URL (`http://127.0.0.1:PORT`).
    pub urls: Vec<(String, String)>,
    /// The admin token of the round's processes.
    pub admin_token: String,
    /// The processes to stop.
    pub processes: Vec<Started>,
    /// A cluster's state directory, stopped with `deploy/local/down` (cluster rounds only).
    #[serde(default)]
    pub cluster_dir: Option<std::path::PathBuf>,
}

/// How an answer compares with the cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Every field right.
    Correct,
    /// Some fields right.
    Partly,
    /// None right.
    Wrong,
}

impl Verdict {
    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Correct => "correct",
            Verdict::Partly => "partly",
            Verdict::Wrong => "wrong",
        }
    }
}

/// Grades `answer` (field, value) against `cause`; also returns the fields that were right.
pub fn grade(cause: &Cause, answer: &[(Field, String)]) -> (Verdict, Vec<Field>) {
    let right: Vec<Field> = answer
        .iter()
        .filter(|(field, value)| cause.get(*field).is_some_and(|truth| truth.eq_ignore_ascii_case(value.trim())))
        .map(|(field, _)| *field)
        .collect();
    let verdict = match right.len() {
        n if n == answer.len() && n > 0 => Verdict::Correct,
        0 => Verdict::Wrong,
        _ => Verdict::Partly,
    };
    (verdict, right)
}

/// One line of the scoreboard.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Score {
    /// The team.
    pub team: String,
    /// The challenge.
    pub challenge: String,
    /// The round's seed.
    pub seed: u64,
    /// The answer's grade.
    pub verdict: Verdict,
    /// Which answer of the round it was (1 = first).
    pub attempt: u32,
    /// Seconds from the round's start to the answer.
    pub elapsed_secs: u64,
    /// Whether the cause had been revealed before.
    pub after_reveal: bool,
}

/// The lab directory's files.
#[derive(Debug, Clone)]
pub struct LabDir {
    root: PathBuf,
}

impl LabDir {
    /// The lab directory at `root`.
    pub fn new(root: PathBuf) -> Self {
        Self { root }
    }

    /// The directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn round_file(&self) -> PathBuf {
        self.root.join("round.json")
    }

    fn scoreboard_file(&self) -> PathBuf {
        self.root.join("scoreboard.jsonl")
    }

    /// The round in progress, if any.
    pub fn round(&self) -> anyhow::Result<Option<Round>> {
        let path = self.round_file();
        match std::fs::read(&path) {
            Ok(bytes) => {
                Ok(Some(serde_json::from_slice(&bytes).with_context(|| format!("reading {}", path.display()))?))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Saves the round (written aside, then renamed, so a reader never sees half of it).
    pub fn save(&self, round: &Round) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.root).with_context(|| format!("creating {}", self.root.display()))?;
        let path = self.round_file();
        let aside = path.with_extension("json.tmp");
        std::fs::write(&aside, serde_json::to_vec_pretty(round)?)
            .with_context(|| format!("writing {}", aside.display()))?;
        std::fs::rename(&aside, &path).with_context(|| format!("writing {}", path.display()))
    }

    /// Forgets the round.
    pub fn clear(&self) -> anyhow::Result<()> {
        match std::fs::remove_file(self.round_file()) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).context("removing round.json"),
            _ => Ok(()),
        }
    }

    /// Appends a score.
    pub fn record(&self, score: &Score) -> anyhow::Result<()> {
        let path = self.scoreboard_file();
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        let mut line = serde_json::to_vec(score)?;
        line.push(b'\n');
        file.write_all(&line).with_context(|| format!("writing {}", path.display()))
    }

    /// Every score, oldest first (a line that does not parse is skipped with a warning).
    pub fn scores(&self) -> anyhow::Result<Vec<Score>> {
        let path = self.scoreboard_file();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        Ok(text
            .lines()
            .enumerate()
            .filter(|(_, line)| !line.trim().is_empty())
            .filter_map(|(i, line)| match serde_json::from_str(line) {
                Ok(score) => Some(score),
                Err(e) => {
                    eprintln!("chat lab: {}:{}: skipped: {e}", path.display(), i + 1);
                    None
                }
            })
            .collect())
    }
}

/// The scoreboard as a table: one row per team and challenge round, best verdict first, then
/// the quickest correct answer.
pub fn scoreboard_table(scores: &[Score]) -> String {
    use std::collections::BTreeMap;
    struct Row {
        verdict: Verdict,
        attempts: u32,
        solved_secs: Option<u64>,
    }
    let mut rows: BTreeMap<(String, String, u64), Row> = BTreeMap::new();
    for score in scores.iter().filter(|s| !s.after_reveal) {
        let row = rows.entry((score.team.clone(), score.challenge.clone(), score.seed)).or_insert(Row {
            verdict: Verdict::Wrong,
            attempts: 0,
            solved_secs: None,
        });
        if row.solved_secs.is_some() {
            continue;
        }
        row.attempts = row.attempts.max(score.attempt);
        if score.verdict == Verdict::Correct {
            row.solved_secs = Some(score.elapsed_secs);
        }
        if score.verdict == Verdict::Correct || (score.verdict == Verdict::Partly && row.verdict == Verdict::Wrong) {
            row.verdict = score.verdict;
        }
    }
    let mut sorted: Vec<_> = rows.into_iter().collect();
    sorted.sort_by_key(|(_, row)| {
        (row.solved_secs.is_none(), row.solved_secs, row.verdict != Verdict::Partly, row.attempts)
    });
    let mut out = format!(
        "{:<16} {:<24} {:>20} {:<8} {:>8} {:>10}\n",
        "team", "challenge", "seed", "best", "attempts", "solved in"
    );
    for ((team, challenge, seed), row) in sorted {
        let solved = row.solved_secs.map_or_else(|| "-".to_owned(), |s| format!("{}m{:02}s", s / 60, s % 60));
        out.push_str(&format!(
            "{team:<16} {challenge:<24} {seed:>20} {:<8} {:>8} {solved:>10}\n",
            row.verdict.name(),
            row.attempts
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cause() -> Cause {
        Cause {
            process: "chat".into(),
            hop: "gateway.deliver".into(),
            kind: "drop".into(),
            room: Some("lab-r3".into()),
        }
    }

    #[test]
    fn grades_every_field_some_or_none() {
        let answer = |hop: &str, kind: &str, room: &str| {
            vec![(Field::Hop, hop.to_owned()), (Field::Kind, kind.to_owned()), (Field::Room, room.to_owned())]
        };
        assert_eq!(grade(&cause(), &answer("gateway.deliver", "DROP", " lab-r3")).0, Verdict::Correct);
        assert_eq!(
            grade(&cause(), &answer("gateway.deliver", "delay", "lab-r3")),
            (Verdict::Partly, vec![Field::Hop, Field::Room])
        );
        assert_eq!(grade(&cause(), &answer("fanout.publish", "delay", "lab-r1")).0, Verdict::Wrong);
        assert_eq!(grade(&cause(), &[]).0, Verdict::Wrong);
    }

    #[test]
    fn the_table_ranks_solved_rounds_by_time_and_ignores_answers_after_a_reveal() {
        let score = |team: &str, verdict, attempt, elapsed_secs, after_reveal| Score {
            team: team.into(),
            challenge: "missing-message".into(),
            seed: 1,
            verdict,
            attempt,
            elapsed_secs,
            after_reveal,
        };
        let table = scoreboard_table(&[
            score("slow", Verdict::Wrong, 1, 30, false),
            score("slow", Verdict::Correct, 2, 400, false),
            score("quick", Verdict::Correct, 1, 125, false),
            score("stuck", Verdict::Partly, 1, 50, false),
            score("stuck", Verdict::Correct, 2, 60, true),
        ]);
        let rows: Vec<&str> = table.lines().skip(1).collect();
        assert!(rows[0].starts_with("quick") && rows[0].contains("2m05s"), "{table}");
        assert!(rows[1].starts_with("slow") && rows[1].contains("correct") && rows[1].contains("6m40s"), "{table}");
        assert!(rows[2].starts_with("stuck") && rows[2].contains("partly") && rows[2].ends_with('-'), "{table}");
    }
}
