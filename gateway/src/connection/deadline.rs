//! A send's deadline is the client's: the gateway answers every admitted send by it, whatever
//! the workers, the bus or the store are doing.
//!
//! The workers get an earlier instant (`SendCommand::deadline_ms`): the send's deadline less
//! the time their answer takes to reach the gateway, so an ack or refusal they decide by then
//! arrives in time. A send the gateway has heard nothing about just before its deadline is
//! answered `internal`, "not known yet": it may still be stored (a write in flight, an answer
//! lost on the way), so `unavailable` ("not stored") would not be true. The client retries with
//! the same `client_msg_id`: the retry stores it at most once and answers with its ack. The
//! gateway keeps listening a while for the worker's late word, to record what became of it.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use protocol::bus::SendOutcome;

/// How long before the send's deadline a worker must have decided it, for its answer to reach
/// the gateway in time. A refusal decided on the overloaded ring of three took up to 439 ms to
/// arrive (docs/benchmarks.md, Dec 6).
pub(super) const ANSWER_TRAVEL: Duration = Duration::from_millis(500);
/// How long before the send's deadline the gateway gives up waiting, so its answer is written
/// (and timed, `chat_send_answer_seconds`) within the deadline.
pub(super) const ANSWER_WRITE: Duration = Duration::from_millis(50);
/// How long after answering the gateway still listens for a worker's word on the send, to
/// record its fate: more than any store write a worker may finish after its deadline.
pub(super) const LATE_WORD_WINDOW: Duration = Duration::from_secs(6);

/// How long after receiving a send the workers may still store it.
pub(super) fn store_within(deadline: Duration) -> Duration {
    deadline.saturating_sub(ANSWER_TRAVEL).max(deadline / 2)
}

/// How long after receiving a send the gateway answers it even without a worker's answer.
pub(super) fn answer_within(deadline: Duration) -> Duration {
    deadline.saturating_sub(ANSWER_WRITE)
}

/// A send's answer on its way from the workers.
pub(super) type Pending = Pin<Box<dyn Future<Output = Result<SendOutcome, bus::BusError>> + Send>>;

/// The worker's answer if it comes within `within`; otherwise `Err(pending)`, the answer still
/// on its way, for [`late_word`].
pub(super) async fn answer_in_time(
    mut pending: Pending,
    within: Duration,
) -> Result<Result<SendOutcome, bus::BusError>, Pending> {
    match tokio::time::timeout(within, &mut pending).await {
        Ok(answer) => Ok(answer),
        Err(_) => Err(pending),
    }
}

/// The answer for a send the workers did not answer in time.
pub(super) fn not_known_yet() -> bus::BusError {
    bus::BusError::indeterminate("no answer from the sequencer by the send's deadline")
}

/// What the workers said about a send after the gateway had answered it `internal`.
#[derive(Debug)]
pub(super) enum LateWord {
    /// Stored after all: members got it; the client's retry gets its ack.
    Stored(SendOutcome),
    /// Refused (for the copy that worker held).
    Refused(bus::BusError),
    /// Nothing within [`LATE_WORD_WINDOW`].
    Silent,
}

impl LateWord {
    /// The label of `chat_send_late_words_total`.
    pub(super) fn label(&self) -> &'static str {
        match self {
            Self::Stored(_) => "stored",
            Self::Refused(_) => "refused",
            Self::Silent => "silent",
        }
    }
}

/// Listens for the workers' word on a send already answered `internal`, for up to `window`.
pub(super) async fn late_word(pending: Pending, window: Duration) -> LateWord {
    match tokio::time::timeout(window, pending).await {
        Ok(Ok(outcome)) => LateWord::Stored(outcome),
        Ok(Err(refusal)) => LateWord::Refused(refusal),
        Err(_) => LateWord::Silent,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use protocol::ChatMessage;
    use tokio::time::Instant;
    use uuid::Uuid;

    use super::*;

    const DEADLINE: Duration = Duration::from_secs(5);

    fn stored_after(delay: Duration) -> Pending {
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            let message = ChatMessage {
                room: "r".into(),
                seq: 7,
                id: Uuid::now_v7(),
                user: "alice".into(),
                body: "hi".into(),
                ts: 1,
                client_msg_id: "c-1".into(),
                trace_id: String::new(),
                prev: None,
                digest: None,
            };
            Ok(SendOutcome { message, duplicate: false })
        })
    }

    #[test]
    fn workers_decide_in_time_for_their_answer_to_arrive_and_the_gateway_answers_by_the_deadline() {
        assert_eq!(store_within(DEADLINE), Duration::from_millis(4_500));
        assert_eq!(answer_within(DEADLINE), Duration::from_millis(4_950));
        assert!(store_within(DEADLINE) + Duration::from_millis(439) < answer_within(DEADLINE));
        // A short deadline keeps at least half of it for the workers.
        assert_eq!(store_within(Duration::from_millis(600)), Duration::from_millis(300));
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_in_time_is_passed_on() {
        let answer = answer_in_time(stored_after(Duration::from_secs(4)), answer_within(DEADLINE)).await;
        assert_eq!(answer.ok().unwrap().unwrap().message.seq, 7);
    }

    #[tokio::test(start_paused = true)]
    async fn a_send_without_an_answer_is_answered_by_its_deadline_and_its_late_word_recorded() {
        let started = Instant::now();
        let Err(pending) = answer_in_time(stored_after(Duration::from_secs(7)), answer_within(DEADLINE)).await else {
            panic!("answered in time")
        };
        assert_eq!(started.elapsed(), answer_within(DEADLINE));
        assert!(started.elapsed() < DEADLINE);
        assert_eq!(not_known_yet().kind(), bus::BusErrorKind::Indeterminate);
        // The worker stored it at 7 s: recorded as stored, though the client heard `internal`.
        let word = late_word(pending, LATE_WORD_WINDOW).await;
        assert!(matches!(&word, LateWord::Stored(outcome) if outcome.message.seq == 7), "{word:?}");
        assert_eq!(word.label(), "stored");
    }

    #[tokio::test(start_paused = true)]
    async fn late_refusals_and_silence_are_told_apart() {
        let refused: Pending = Box::pin(async { Err(bus::BusError::unavailable("worker: past its deadline")) });
        assert_eq!(late_word(refused, LATE_WORD_WINDOW).await.label(), "refused");
        let started = Instant::now();
        let never: Pending = Box::pin(std::future::pending());
        assert_eq!(late_word(never, LATE_WORD_WINDOW).await.label(), "silent");
        assert_eq!(started.elapsed(), LATE_WORD_WINDOW);
    }
}
