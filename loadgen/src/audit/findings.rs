//! What the audit reports: the kinds of finding, one [`Finding`] with what a person needs to
//! look the message up, exact counts per kind, and the [`AuditResult`] that carries the verdict.
//! These are serialized as they are into the JSON report.

use serde::Serialize;

/// Kinds of findings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    /// An expected member never got an acked message.
    Missing,
    /// A member got a seq twice.
    Duplicate,
    /// A member got a seq after a higher one.
    Reordered,
    /// A member's stream skipped a seq that never came.
    Gap,
    /// A send got no answer at all.
    Unacked,
    /// One send was stored as two messages.
    StoredTwice,
    /// A send was answered with an error, which says it was not stored, yet it was delivered.
    RefusedButDelivered,
    /// A send was answered with an error and never delivered (not a failure).
    Rejected,
    /// A send was answered `internal` (which promises nothing about storage: the server could
    /// not tell), and the message was delivered: stored once (not a failure).
    UnknownThenStored,
    /// A message whose chain digest does not match its fields: altered after sequencing.
    ChainAltered,
    /// Two different messages claimed one seq (the next message chains to another version, or
    /// recipients got different digests).
    Equivocation,
}

impl FindingKind {
    /// Whether this kind fails the audit.
    pub fn fails(self) -> bool {
        !matches!(self, Self::Rejected | Self::UnknownThenStored)
    }

    /// The kind's name in reports (as in the JSON).
    pub fn name(self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Duplicate => "duplicate",
            Self::Reordered => "reordered",
            Self::Gap => "gap",
            Self::Unacked => "unacked",
            Self::StoredTwice => "stored_twice",
            Self::RefusedButDelivered => "refused_but_delivered",
            Self::Rejected => "rejected",
            Self::UnknownThenStored => "unknown_then_stored",
            Self::ChainAltered => "chain_altered",
            Self::Equivocation => "equivocation",
        }
    }
}

/// One thing the audit found, with what a person needs to look it up.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// What went wrong.
    pub kind: FindingKind,
    /// The room name.
    pub room: String,
    /// The message's seq, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// The message id, when known: look it up at `/debug/messages/{id}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The W3C trace id, when some recipient saw the message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// The sender's `client_msg_id`, for this run's own messages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_msg_id: Option<String>,
    /// How many recipients (or occurrences) are affected.
    pub count: u64,
    /// Up to ten of the affected users.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub recipients: Vec<String>,
    /// A sentence of context.
    pub detail: String,
}

/// Exact counts per kind.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct FindingCounts {
    /// Messages with at least one missing delivery.
    pub missing_messages: u64,
    /// Missing (message, member) deliveries.
    pub missing_deliveries: u64,
    /// Duplicate deliveries.
    pub duplicate_deliveries: u64,
    /// Reordered deliveries.
    pub reordered_deliveries: u64,
    /// (member, seq) pairs skipped and never delivered.
    pub gap_seqs: u64,
    /// Sends with no answer.
    pub unacked: u64,
    /// Sends stored twice.
    pub stored_twice: u64,
    /// Sends answered with an error yet delivered.
    pub refused_but_delivered: u64,
    /// Sends answered with an error and never delivered.
    pub rejected: u64,
    /// Sends answered `internal` (outcome unknown) and then delivered.
    pub unknown_then_stored: u64,
    /// Deliveries of a message whose digest does not match its fields.
    pub chain_altered: u64,
    /// Deliveries that revealed two versions of one seq.
    pub equivocations: u64,
}

/// The audit's verdict with its evidence.
#[derive(Debug, Clone, Serialize)]
pub struct AuditResult {
    /// True when nothing failing was found and at least one message was acked (or none was
    /// scheduled).
    pub passed: bool,
    /// One line saying why.
    pub verdict: String,
    /// Sends in the schedule.
    pub scheduled: u64,
    /// Sends written to a socket.
    pub sent: u64,
    /// Sends acked.
    pub acked: u64,
    /// Sends scheduled but never written (client not connected, local backlog).
    pub not_sent: u64,
    /// Memberships joined at the end, whose deliveries were audited.
    pub members_audited: u64,
    /// Memberships of the plan not joined at the end (connect or join failed, dropped for good,
    /// or the client did not stop in time: error `stop_timeout`).
    pub members_excluded: u64,
    /// Audited memberships that expected no message: no acked send to their room was written
    /// after they joined (a run that means every member to receive wants 0 here).
    pub members_expecting_none: u64,
    /// (acked message, expected member) pairs.
    pub expected_deliveries: u64,
    /// Of those, delivered.
    pub delivered: u64,
    /// Message frames for rooms the connection had not joined.
    pub stray_deliveries: u64,
    /// Exact counts per kind.
    pub counts: FindingCounts,
    /// Findings, at most `max_findings` per kind, ordered by kind, room, seq.
    pub findings: Vec<Finding>,
    /// Some findings were left out of the list.
    pub findings_truncated: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_names_are_the_json_names_and_only_rejected_and_unknown_pass() {
        let all = [
            FindingKind::Missing,
            FindingKind::Duplicate,
            FindingKind::Reordered,
            FindingKind::Gap,
            FindingKind::Unacked,
            FindingKind::StoredTwice,
            FindingKind::RefusedButDelivered,
            FindingKind::Rejected,
            FindingKind::UnknownThenStored,
            FindingKind::ChainAltered,
            FindingKind::Equivocation,
        ];
        for k in all {
            assert_eq!(serde_json::to_value(k).ok(), Some(serde_json::Value::from(k.name())));
            assert_eq!(k.fails(), !matches!(k, FindingKind::Rejected | FindingKind::UnknownThenStored));
        }
    }
}
