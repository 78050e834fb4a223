//! The challenges of the debugging lab and the causes each can plant.
//!
//! A challenge is a symptom players are told about; a *variant* is one cause that produces it
//! (a mechanism at a hop, in a room or a process). `chat lab start` draws one variant, and the
//! room or process it strikes, from the round's seed, so several teams given the same seed play
//! the same round. Causes are planted as sealed faults (see `faults::FaultSpec::sealed`) or as
//! a bad configuration: either way they leave only the evidence a real defect would.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// Rooms the lab's traffic uses: `lab-r0` .. `lab-r7`.
pub const ROOMS: u32 = 8;
/// Prefix of the lab traffic's users and rooms.
pub const PREFIX: &str = "lab";

/// A field an answer gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Field {
    /// The process at fault (a process id as in `welcome.gateway` and journeys).
    Process,
    /// The hop where it goes wrong (`gateway.deliver`, `fanout.publish`, ...).
    Hop,
    /// The mechanism (`drop`, `delay`, ...).
    Kind,
    /// The room it strikes.
    Room,
}

impl Field {
    /// The answer flag's name.
    pub fn flag(self) -> &'static str {
        match self {
            Field::Process => "--process",
            Field::Hop => "--hop",
            Field::Kind => "--kind",
            Field::Room => "--room",
        }
    }
}

/// Processes a round runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology {
    /// One all-in-one `chat` process named `chat`.
    AllInOne,
    /// Three all-in-one processes, three "releases" of the same build with different
    /// configuration profiles: `release-a`, `release-b`, `release-c`.
    Releases,
    /// The local cluster of `deploy/local/up`: gateways `gw-1` (8081) and `gw-2` (8082),
    /// workers `fanout-1` (9091) and `fanout-2` (9092), on NATS and a CQL store.
    Cluster,
}

impl Topology {
    /// The processes' ids, in port order.
    pub fn processes(self) -> &'static [&'static str] {
        match self {
            Topology::AllInOne => &["chat"],
            Topology::Releases => &["release-a", "release-b", "release-c"],
            Topology::Cluster => &["gw-1", "gw-2", "fanout-1", "fanout-2"],
        }
    }

    /// The processes that can play `role` (every process of a topology without separate
    /// gateways and workers).
    fn candidates(self, role: Role) -> Vec<&'static str> {
        let prefix = match (self, role) {
            (Topology::Cluster, Role::Gateway) => "gw-",
            (Topology::Cluster, Role::Worker) => "fanout-",
            _ => "",
        };
        self.processes().iter().copied().filter(|p| p.starts_with(prefix)).collect()
    }
}

/// What a mechanism strikes: a gateway or a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Gateway,
    Worker,
}

/// One challenge.
#[derive(Debug)]
pub struct Challenge {
    /// Its name on the command line.
    pub name: &'static str,
    /// Its page in docs/exercises/.
    pub page: &'static str,
    /// The one-line symptom `chat lab list` shows.
    pub symptom: &'static str,
    /// What players are told when a round starts (the symptom at length; never the cause).
    pub story: &'static str,
    /// The processes it runs.
    pub topology: Topology,
    /// The fields an answer must give.
    pub asks: &'static [Field],
    /// The mechanisms it can plant; each strikes a room or a process drawn with it, so the
    /// pool of variants is mechanisms × rooms (or processes).
    pub variants: &'static [Mechanism],
    /// Whether the round restarts NATS once its traffic flows (a cluster's routine
    /// maintenance, told in the story).
    pub restarts_bus: bool,
}

/// A way to produce a challenge's symptom.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// Deliveries of one room lost while being written to one connection.
    DeliverDrop,
    /// One room's messages lost between the worker and the gateway, and gap repair off.
    PublishDropUnrepaired,
    /// One release's worker waits before sequencing each batch.
    SequenceDelay,
    /// One release's worker waits before publishing each stored message.
    PublishDelay,
    /// One release's gateway waits before writing each message to a connection.
    DeliverDelay,
    /// Two rooms' locks taken in opposite orders by the worker: a deadlock once both rooms
    /// are in one batch.
    LockInversion,
    /// The worker holds every room's sends for longer than their deadline.
    SequenceStall,
    /// The worker publishes each stored message seconds late (and acks after publishing).
    PublishStall,
    /// One gateway loses its bus connection: its users cannot send and receive nothing live.
    NatsCut,
    /// One gateway receives rooms' messages from the bus seconds late.
    FeedDelay,
    /// One gateway takes in workers' answers to its sends seconds late.
    AnswerDelay,
    /// Now and then one worker holds a batch past the bus's redelivery timeout.
    WorkerStall,
    /// Now and then one worker publishes a stored message past the redelivery timeout.
    WorkerPublishDelay,
    /// One gateway rewrites some bodies as it writes them to connections.
    GatewayRewrite,
    /// One worker stores the true message but publishes a forged copy (digest recomputed).
    WorkerEquivocate,
    /// One worker stamps `ts` 90 s in the past.
    ClockSkew,
    /// One worker publishes some stored messages under the next seq (digest untouched).
    SeqForge,
    /// After a bus reconnect, one gateway does not restore its subscription to one room.
    ResubscribeLost,
    /// One gateway's slow-consumer policy is misconfigured: a connection queue of one frame,
    /// and what a full queue skips is dropped instead of caught up from the store.
    SlowConsumerDrop,
    /// Most of one worker's heartbeats are lost: the other worker keeps forgetting it and
    /// taking its partitions while it still pulls them, so the two fence each other off.
    OwnershipFlap,
}

/// The planted cause of a round: what an answer is graded against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cause {
    /// The process at fault.
    pub process: String,
    /// Where.
    pub hop: String,
    /// What.
    pub kind: String,
    /// The room it strikes, when it strikes one.
    pub room: Option<String>,
}

impl Cause {
    /// The cause's value for `field`.
    pub fn get(&self, field: Field) -> Option<&str> {
        match field {
            Field::Process => Some(&self.process),
            Field::Hop => Some(&self.hop),
            Field::Kind => Some(&self.kind),
            Field::Room => self.room.as_deref(),
        }
    }
}

/// A fault to plant in one process (`POST /admin/faults`, sealed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plant {
    /// The process.
    pub process: String,
    /// The fault's JSON.
    pub fault: Value,
}

/// What a seed drew for a challenge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Planted {
    /// The mechanism's name (for `reveal`).
    pub variant: String,
    /// The cause.
    pub cause: Cause,
    /// The faults planted.
    pub plants: Vec<Plant>,
    /// Where the evidence is, for `reveal`.
    pub evidence: String,
}

/// Every challenge.
pub const CHALLENGES: &[Challenge] = &[
    Challenge {
        name: "missing-message",
        page: "docs/exercises/01-trace-the-missing-message.md",
        symptom: "some members of one room miss some messages; nothing else is wrong",
        story: "Users of one of the busy rooms (lab-r0 .. lab-r7) report that a message now and then never \
                reaches them, while the sender got an ack. Everyone else is happy. Find the room, the hop \
                where the messages are lost, and how.",
        topology: Topology::AllInOne,
        asks: &[Field::Hop, Field::Kind, Field::Room],
        variants: &[Mechanism::DeliverDrop, Mechanism::PublishDropUnrepaired],
        restarts_bus: false,
    },
    Challenge {
        name: "performance-regression",
        page: "docs/exercises/03-diagnose-the-performance-regression.md",
        symptom: "one of three releases is slower; which one, and where does the time go?",
        story: "Three releases of the server run side by side (release-a, release-b, release-c), each with \
                its own traffic. Since the last deploy, one of them is slower for its users. Nothing is \
                lost and nothing fails. Find the slow release and the hop that takes the extra time.",
        topology: Topology::Releases,
        asks: &[Field::Process, Field::Hop, Field::Kind],
        variants: &[Mechanism::SequenceDelay, Mechanism::PublishDelay, Mechanism::DeliverDelay],
        restarts_bus: false,
    },
    Challenge {
        name: "stuck-sends",
        page: "docs/exercises/02-find-the-distributed-deadlock.md",
        symptom: "on the cluster, every send in every room hangs, then fails with internal (not known yet)",
        story: "Since a few seconds after start, sends in every room of the cluster hang for five seconds \
                and end in `internal` (\"not known yet\"). Every process is up, /readyz says ready \
                everywhere, the CPUs are idle. Is it a deadlock? Find the hop where sends get stuck and \
                the kind of stop (`deadlock`, `stall` or `delay`).",
        topology: Topology::Cluster,
        asks: &[Field::Hop, Field::Kind],
        variants: &[Mechanism::LockInversion, Mechanism::SequenceStall, Mechanism::PublishStall],
        restarts_bus: false,
    },
    Challenge {
        name: "byzantine",
        page: "docs/exercises/04-debug-the-byzantine-failure.md",
        symptom: "on the cluster, some users see messages others never sent, or at impossible times",
        story: "Users of the same room compare screens and disagree: one sees a message with words \
                the sender swears she never typed, or a message stamped a minute and a half before the \
                one it answers, or one message twice where the history shows another. Sends are \
                acked, no process fails. One process of the cluster lies. Which one, at which hop, \
                and how?",
        topology: Topology::Cluster,
        asks: &[Field::Process, Field::Hop, Field::Kind],
        variants: &[Mechanism::GatewayRewrite, Mechanism::WorkerEquivocate, Mechanism::ClockSkew, Mechanism::SeqForge],
        restarts_bus: false,
    },
    Challenge {
        name: "partitioned-gateway",
        page: "docs/exercises/06-the-partitioned-gateway.md",
        symptom: "on the cluster, some users cannot send, wait for acks or get messages late; the others are fine",
        story: "The cluster runs two gateways behind a load balancer. About half of the users complain: \
                some cannot send (their sends fail with `unavailable`) or wait seconds for each send to \
                be acked, or get everyone's messages seconds late. The other half see nothing wrong. \
                Find the process at fault, the hop and what happens there.",
        topology: Topology::Cluster,
        asks: &[Field::Process, Field::Hop, Field::Kind],
        variants: &[Mechanism::NatsCut, Mechanism::FeedDelay, Mechanism::AnswerDelay],
        restarts_bus: false,
    },
    Challenge {
        name: "duplicate-after-stall",
        page: "docs/exercises/07-the-duplicate-after-a-worker-stall.md",
        symptom: "on the cluster, now and then a send takes 4-5 s to be acked, and the bus delivers it twice",
        story: "Now and then a send on the cluster takes four or five seconds to be acked, and \
                chat_send_redeliveries_total creeps up: the bus delivered some sends to a worker twice. \
                Nobody saw a duplicate message, but the on-call engineer wants to know whether anything \
                was stored twice, and which worker stalls where.",
        topology: Topology::Cluster,
        asks: &[Field::Process, Field::Hop, Field::Kind],
        variants: &[Mechanism::WorkerStall, Mechanism::WorkerPublishDelay],
        restarts_bus: false,
    },
    Challenge {
        name: "lost-after-maintenance",
        page: "docs/exercises/08-lost-after-maintenance.md",
        symptom: "on the cluster, since NATS was restarted, some users miss messages that were acked",
        story: "The cluster's NATS server was restarted for maintenance a moment ago (this round did it: \
                see the bus's log). Every process reconnected and /readyz says ready everywhere. Since \
                then some users miss messages: the sender got an ack, others in the room saw the \
                message, they never did. Find the process that loses them and the hop where they are \
                lost.",
        topology: Topology::Cluster,
        asks: &[Field::Process, Field::Hop],
        variants: &[Mechanism::ResubscribeLost, Mechanism::SlowConsumerDrop, Mechanism::DeliverDrop],
        restarts_bus: true,
    },
    Challenge {
        name: "refused-sends",
        page: "docs/exercises/09-refused-sends.md",
        symptom: "on the cluster, sends hang for seconds in waves, and some fail with internal (not known yet)",
        story: "Users of the cluster say their messages go missing now and then: a message hangs on \
                'sending' for seconds, then fails with `internal` (\"not known yet\"), or gets through \
                late. It comes in waves, in any room; between waves all is well. No process restarted, \
                /readyz says ready everywhere, NATS and the store are healthy. Find the process at \
                fault, the hop where it goes wrong and what happens there.",
        topology: Topology::Cluster,
        asks: &[Field::Process, Field::Hop, Field::Kind],
        variants: &[Mechanism::OwnershipFlap, Mechanism::WorkerStall],
        restarts_bus: false,
    },
];

/// The challenge called `name`.
pub fn challenge(name: &str) -> Option<&'static Challenge> {
    CHALLENGES.iter().find(|c| c.name == name)
}

/// The names of every challenge, for error messages.
pub fn names() -> String {
    CHALLENGES.iter().map(|c| c.name).collect::<Vec<_>>().join(", ")
}

impl Challenge {
    /// The cause `seed` draws: a variant, and the room or process it strikes.
    pub fn draw(&self, seed: u64) -> Planted {
        let mut rng = StdRng::seed_from_u64(seed);
        let mechanism = self.variants[rng.random_range(0..self.variants.len())];
        let room = format!("{PREFIX}-r{}", rng.random_range(0..ROOMS));
        let processes = self.topology.candidates(mechanism.role());
        let process = processes[rng.random_range(0..processes.len())].to_owned();
        mechanism.plant(process, room, &self.topology.candidates(Role::Worker))
    }
}

/// A sealed fault's JSON.
fn sealed(hop: &str, action: &str, extra: Value) -> Value {
    let mut fault = json!({"hop": hop, "action": action, "sealed": true});
    if let (Some(fault), Some(extra)) = (fault.as_object_mut(), extra.as_object()) {
        fault.extend(extra.clone());
    }
    fault
}

impl Mechanism {
    /// The mechanism's name.
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::DeliverDrop => "deliver-drop",
            Mechanism::PublishDropUnrepaired => "publish-drop-unrepaired",
            Mechanism::SequenceDelay => "sequence-delay",
            Mechanism::PublishDelay => "publish-delay",
            Mechanism::DeliverDelay => "deliver-delay",
            Mechanism::LockInversion => "lock-inversion",
            Mechanism::SequenceStall => "sequence-stall",
            Mechanism::PublishStall => "publish-stall",
            Mechanism::NatsCut => "nats-cut",
            Mechanism::FeedDelay => "feed-delay",
            Mechanism::AnswerDelay => "answer-delay",
            Mechanism::WorkerStall => "worker-stall",
            Mechanism::WorkerPublishDelay => "worker-publish-delay",
            Mechanism::GatewayRewrite => "gateway-rewrite",
            Mechanism::WorkerEquivocate => "worker-equivocate",
            Mechanism::ClockSkew => "clock-skew",
            Mechanism::SeqForge => "seq-forge",
            Mechanism::ResubscribeLost => "resubscribe-lost",
            Mechanism::SlowConsumerDrop => "slow-consumer-drop",
            Mechanism::OwnershipFlap => "ownership-flap",
        }
    }

    /// Whether it strikes a gateway or a worker.
    fn role(self) -> Role {
        match self {
            Mechanism::DeliverDrop
            | Mechanism::DeliverDelay
            | Mechanism::NatsCut
            | Mechanism::FeedDelay
            | Mechanism::AnswerDelay
            | Mechanism::GatewayRewrite
            | Mechanism::ResubscribeLost
            | Mechanism::SlowConsumerDrop => Role::Gateway,
            _ => Role::Worker,
        }
    }

    /// The faults that plant it in `process` (and `room`, for the mechanisms that strike one);
    /// the mechanisms that stop every room plant it in every one of the topology's `workers`.
    fn plant(self, process: String, room: String, workers: &[&str]) -> Planted {
        let at = |fault: Value| Plant { process: process.clone(), fault };
        let no_repair = || at(sealed("gateway.gap_repair", "disable", json!({})));
        let cause = |hop: &str, kind: &str, room: Option<&str>| Cause {
            process: process.clone(),
            hop: hop.into(),
            kind: kind.into(),
            room: room.map(str::to_owned),
        };
        let drop_in_room = |hop: &str| at(sealed(hop, "drop", json!({"room": room, "probability": 0.25, "seed": 7})));
        let delay = |hop: &str| at(sealed(hop, "delay", json!({"delay_ms": 40})));
        let at_every_worker =
            |fault: Value| workers.iter().map(|w| Plant { process: (*w).to_owned(), fault: fault.clone() }).collect();
        // The room whose lock sequencing `room` also takes: with several workers, one that
        // another worker sequences (its partition's owner differs), so the cycle spans two
        // processes.
        let other_room = {
            let n: u32 = room.rsplit('r').next().and_then(|n| n.parse().ok()).unwrap_or(0);
            let sequencer =
                |room: &str| bus::nats::partition_owner(protocol::subjects::partition(room), workers.iter().copied());
            (1..ROOMS)
                .map(|k| format!("{PREFIX}-r{}", (n + k + n % 3) % ROOMS))
                .find(|other| workers.len() < 2 || sequencer(other) != sequencer(&room))
                .unwrap_or_else(|| format!("{PREFIX}-r{}", (n + 1) % ROOMS))
        };
        let other_worker = if process == "fanout-1" { "fanout-2" } else { "fanout-1" };
        let (cause, plants, evidence) = match self {
            Mechanism::DeliverDrop => (
                cause("gateway.deliver", "drop", Some(&room)),
                vec![drop_in_room("gateway.deliver")],
                format!(
                    "A loadgen run names the missing deliveries, all in {room}: a message is missing for \
                     some members only. Its journey (chat trace ID) ends with gateway.fanout whose \
                     `connections` counts every member, so the gateway queued it for all of them; it was \
                     lost after that, writing to the socket (gateway.deliver). No gap repair runs: the \
                     connection's own seqs have no hole the feed could see."
                ),
            ),
            Mechanism::PublishDropUnrepaired => (
                cause("fanout.publish", "drop", Some(&room)),
                vec![drop_in_room("fanout.publish"), no_repair()],
                format!(
                    "Every member of {room} misses the same messages. Their journeys end at \
                     fanout.publish: stored and published, but no gateway.fanout hop, so the gateway \
                     never had them; the next message's journey has gateway.gap_unrepaired naming the \
                     missing seqs (gap repair is off), and chat_gap_repairs_total stays 0. The worker's \
                     publish is where they vanished: the chat_deliveries_total rate is below \
                     chat_sequenced_total times the members."
                ),
            ),
            Mechanism::SequenceDelay => (
                cause("fanout.sequence", "delay", None),
                vec![delay("fanout.sequence")],
                format!(
                    "loadgen against each release (loadgen compare) shows {process} slower in send→ack and \
                     in delivery. Its journeys show the time between gateway.receive and \
                     fanout.sequence (about 40 ms), the other hops as quick as on the other releases."
                ),
            ),
            Mechanism::PublishDelay => (
                cause("fanout.publish", "delay", None),
                vec![delay("fanout.publish")],
                format!(
                    "loadgen against each release shows {process} slower in send→ack and in delivery. Its \
                     journeys show the time between store.append and fanout.publish (about 40 ms): the \
                     worker publishes late, and acks after publishing."
                ),
            ),
            Mechanism::DeliverDelay => (
                cause("gateway.deliver", "delay", None),
                vec![delay("gateway.deliver")],
                format!(
                    "loadgen against each release shows {process} slower in delivery only: send→ack is \
                     as fast as elsewhere, and the journeys' hops up to gateway.fanout are as quick as on \
                     the other releases. The time is spent after the gateway queued the message, \
                     writing it to each connection."
                ),
            ),
            Mechanism::LockInversion => (
                cause("fanout.sequence", "deadlock", Some(&room)),
                [
                    sealed("fanout.lock", "cross_lock", json!({"room": room, "with_room": other_room})),
                    sealed("fanout.lock", "cross_lock", json!({"room": other_room, "with_room": room})),
                ]
                .into_iter()
                .flat_map(at_every_worker)
                .collect(),
                format!(
                    "chat debug waits over every process shows a cycle across the two workers: the \
                     worker sequencing {room} (`sequence {room}`) holds room-lock:{room} and waits for \
                     room-lock:{other_room}, which the other worker's `sequence {other_room}` holds while \
                     it waits for room-lock:{room}. The room locks are shared by the workers (a lock \
                     bucket on NATS), and each worker waits for its whole batch, so neither sequences \
                     anything else either. Every send's journey ends at gateway.receive, \
                     chat_sequenced_total stops on both workers, and the gateways' sends wait for \
                     room-sequencer:R."
                ),
            ),
            Mechanism::SequenceStall => (
                cause("fanout.sequence", "stall", None),
                at_every_worker(sealed("fanout.sequence", "stall", json!({"delay_ms": 8000}))),
                "Sends' journeys end at gateway.receive (later fanout.expired: the worker took them \
                 after their deadline); chat_sequenced_total stops. chat debug waits lists the gateway's \
                 sends waiting for room-sequencer:R, held by no operation: no cycle, nothing held. \
                 The worker is not stuck on a lock or the store; it is not taking the sends."
                    .to_owned(),
            ),
            Mechanism::PublishStall => (
                cause("fanout.publish", "delay", None),
                at_every_worker(sealed("fanout.publish", "delay", json!({"delay_ms": 2500}))),
                "The first sends are acked, seconds late; then they are answered `internal` (not known \
                 yet) at their deadline. Their journeys show store.append followed by fanout.publish \
                 2.5 s later. chat debug waits lists `sequence R` holding room-sequencer:R and waiting \
                 for bus.deliver: a chain, no cycle."
                    .to_owned(),
            ),
            Mechanism::NatsCut => (
                cause("gateway.nats", "cut", None),
                vec![at(sealed("gateway.nats", "cut", json!({})))],
                format!(
                    "Only users connected to {process} are hit: their sends fail with `unavailable` \
                     (\"not connected to NATS\" in {process}'s log and in its /readyz, which answers \
                     503 with `bus: not connected to NATS`), and they receive nothing live. The other \
                     gateway is ready and its users' messages flow; the workers are fine."
                ),
            ),
            Mechanism::FeedDelay => (
                cause("gateway.feed", "delay", None),
                vec![at(sealed("gateway.feed", "delay", json!({"delay_ms": 3000})))],
                format!(
                    "Users on {process} receive every message about 3 s late, whoever sent it; their \
                     own sends are acked at once. Journeys: fanout.publish on time, then {process}'s \
                     gateway.fanout 3 s later while the other gateway's follows within milliseconds; \
                     chat_sequence_to_gateway_seconds on {process} sits at 3 s."
                ),
            ),
            Mechanism::AnswerDelay => (
                cause("gateway.answer", "delay", None),
                vec![at(sealed("gateway.answer", "delay", json!({"delay_ms": 3000})))],
                format!(
                    "Users on {process} see their own sends hang about 3 s before the ack, though the \
                     message itself reaches them and everyone else at once; nothing fails. Journeys: \
                     store.append and fanout.publish on time, {process}'s gateway.fanout within \
                     milliseconds, gateway.ack 3 s later. On {process} chat_send_ack_seconds sits above \
                     3 s while chat_sequence_to_answer_seconds (the worker's ack reaching the gateway) \
                     and chat_sequence_to_gateway_seconds stay low: the ack arrived on time and was held \
                     inside the gateway."
                ),
            ),
            Mechanism::WorkerStall => (
                cause("fanout.sequence", "stall", None),
                vec![at(sealed("fanout.sequence", "stall", json!({"delay_ms": 4200, "probability": 0.05, "seed": 3})))],
                format!(
                    "Slow sends' journeys show fanout.redelivered (the bus redelivered after its 4 s \
                     ack wait), then fanout.sequence about 4.2 s after gateway.receive, on {process}; \
                     chat_send_redeliveries_total grows on {process} only. Nothing is stored twice: one \
                     store.append per message, and the redelivered copy is found by its client message id \
                     (fanout.duplicate) or taken as one send."
                ),
            ),
            Mechanism::WorkerPublishDelay => (
                cause("fanout.publish", "delay", None),
                vec![at(sealed("fanout.publish", "delay", json!({"delay_ms": 4200, "probability": 0.05, "seed": 3})))],
                format!(
                    "Slow sends' journeys show store.append on time and fanout.publish about 4.2 s later \
                     on {process}: the message was stored, but the worker acks the bus only after \
                     publishing, so the bus redelivered the send (chat_send_redeliveries_total on \
                     {process}); the redelivery found the stored message (fanout.duplicate): stored once."
                ),
            ),
            Mechanism::GatewayRewrite => (
                cause("gateway.deliver", "rewrite", None),
                vec![at(sealed("gateway.deliver", "rewrite", json!({"probability": 0.3, "seed": 4})))],
                format!(
                    "Messages fail the chain's self-check where they are written: \
                     chat_chain_violations_total{{kind=\"altered\",source=\"deliver\"}} on {process} \
                     only, a chain.violation hop (source deliver, gateway {process}) in their journeys, \
                     loadgen's chain_altered findings for receivers on {process}. The stored message \
                     (history) and what receivers on the other gateway got agree with each other."
                ),
            ),
            Mechanism::WorkerEquivocate => (
                cause("fanout.publish", "equivocate", None),
                vec![at(sealed("fanout.publish", "equivocate", json!({"probability": 0.3, "seed": 4})))],
                format!(
                    "Both gateways report forks: chat_chain_violations_total{{kind=\"fork\",source=\"feed\"}} \
                     and chain.violation hops on two consecutive messages (the next one's `prev` is not \
                     the digest of the one they forwarded). The live copy passes its self-check (its \
                     digest was recomputed) but differs from history: the store has the true body. The \
                     forged messages' journeys name {process} in fanout.sequence and fanout.publish; \
                     loadgen's equivocation findings name the message ids."
                ),
            ),
            Mechanism::ClockSkew => (
                cause("fanout.clock", "skew", None),
                vec![at(sealed("fanout.clock", "skew", json!({"delay_ms": -90000})))],
                format!(
                    "The chain holds (the worker signs its own lie into the digest), so no violation is \
                     counted. But the `ts` of every message {process} sequenced is about 90 s before \
                     the time its journey records for fanout.sequence (`at_us`), and the gateways' \
                     chat_sequence_to_gateway_seconds (measured from `ts`) shows 90 s for its messages."
                ),
            ),
            Mechanism::SeqForge => (
                cause("fanout.publish", "forge_seq", None),
                vec![at(sealed("fanout.publish", "forge_seq", json!({"probability": 0.1, "seed": 4})))],
                format!(
                    "Both gateways count chat_chain_violations_total{{kind=\"altered\",source=\"feed\"}}: \
                     messages arrive from the bus failing their self-check, so the lie is upstream of \
                     the gateways. A flagged message's journey names {process} in fanout.sequence and \
                     fanout.publish, and its chain.violation hop gives the seq it arrived with: one more \
                     than the seq the store (history) has for the same id. Its body is the sender's. \
                     The damage follows: the gateways repair the seq the lie skipped from the store \
                     (the message shows twice, at its true seq and the forged one) and take the room's \
                     true next message for a repeat (chat_drops_total{{reason=\"feed_duplicate\"}}): \
                     loadgen reports it missing, and chain_altered for the forged copy."
                ),
            ),
            Mechanism::ResubscribeLost => (
                cause("gateway.resubscribe", "drop", Some(&room)),
                vec![at(sealed("gateway.resubscribe", "drop", json!({"room": room})))],
                format!(
                    "Only members of {room} connected to {process} miss messages, and they miss every \
                     one sent since the bus restart (a loadgen run over both gateways shows it). A \
                     missing message's journey has gateway.fanout on the other gateway only: {process} \
                     never received it, though its log shows the NATS reconnect and its /readyz is fine. \
                     The bus says why: {bus}/connz?subs=1 lists {process}'s connection without \
                     chat.*.{room}, while it has every other room's subscription. After the \
                     reconnect the subscription was not restored; the room's hub still believes it \
                     follows the room.",
                    bus = super::topology::BUS_MONITOR,
                ),
            ),
            Mechanism::SlowConsumerDrop => (
                cause("gateway.outbox", "drop", None),
                vec![at(sealed("gateway.outbox", "drop", json!({})))],
                format!(
                    "Members connected to {process} miss messages now and then, in every room; members \
                     on the other gateway miss nothing. The missing messages' journeys have \
                     gateway.fanout on {process} with `deferred_queue_full` (the connection's queue was \
                     full, so the message was skipped for it) and \
                     chat_drops_total{{reason=\"queue_full\"}} grows on {process}, yet \
                     chat_drops_total{{reason=\"resynced_from_store\"}} stays 0 there: the skipped \
                     messages are never caught up from the store, and queues fill at once (a queue of \
                     one frame). The slow-consumer policy is set to drop."
                ),
            ),
            Mechanism::OwnershipFlap => (
                cause("fanout.heartbeat", "drop", None),
                vec![at(sealed("fanout.heartbeat", "drop", json!({"probability": 0.7, "seed": 5})))],
                format!(
                    "The waves are {other_worker}'s view of the workers flapping: its chat_workers_live \
                     drops from 2 to 1 and back every few seconds while {process}'s stays at 2, and \
                     {other_worker}'s log says why, naming the peer each time: `worker silent; its \
                     partitions move` (peer {process}), then `worker heard` a moment later. While \
                     {other_worker} has forgotten {process} it pulls {process}'s partitions too \
                     (sum(chat_partitions_owned) is 24, not 16), so both append to the same rooms and fence \
                     each other off: `fence taken` with rising epochs alternating in both logs, \
                     chat_seq_conflicts_total and chat_send_redeliveries_total climbing on both, and a \
                     batch stuck behind a fence's 1 s grace holds every room in it. {process} is the \
                     one whose heartbeats do not reach the others (it never logs a peer silent); \
                     {other_worker} only reacts to the silence. No seq was assigned twice and nothing acked was lost: the \
                     fences held; what users lost are the sends not stored by their deadline while the \
                     workers fought, answered `internal` (not known yet)."
                ),
            ),
        };
        Planted { variant: self.name().to_owned(), cause, plants, evidence }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_challenge_has_three_variants_and_asks_what_its_causes_name() {
        for challenge in CHALLENGES {
            let causes: std::collections::BTreeSet<String> =
                (0..200).map(|s| format!("{:?}", challenge.draw(s).cause)).collect();
            assert!(causes.len() >= 3, "{}: {causes:?}", challenge.name);
            for seed in 0..50 {
                let planted = challenge.draw(seed);
                for field in challenge.asks {
                    assert!(planted.cause.get(*field).is_some(), "{} seed {seed}: {field:?}", challenge.name);
                }
                assert!(planted.plants.iter().all(|p| p.fault["sealed"] == true));
                assert!(challenge.topology.processes().contains(&planted.cause.process.as_str()));
            }
        }
    }

    #[test]
    fn every_challenge_has_its_page_and_every_mechanism_its_solution() {
        let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for challenge in CHALLENGES {
            assert!(docs.join(challenge.page).is_file(), "{}", challenge.page);
            for mechanism in challenge.variants {
                let solution = format!("docs/exercises/solutions/{}.md", mechanism.name());
                assert!(docs.join(&solution).is_file(), "{solution}");
            }
        }
    }

    #[test]
    fn the_cluster_deadlock_spans_two_workers() {
        let stuck = challenge("stuck-sends").unwrap();
        let workers = ["fanout-1", "fanout-2"];
        let sequencer = |room: &str| bus::nats::partition_owner(protocol::subjects::partition(room), workers);
        for seed in 0..100 {
            let planted = stuck.draw(seed);
            if planted.variant != Mechanism::LockInversion.name() {
                continue;
            }
            let rooms: std::collections::BTreeSet<&str> =
                planted.plants.iter().filter_map(|p| p.fault["room"].as_str()).collect();
            let rooms: Vec<&str> = rooms.into_iter().collect();
            assert_eq!(rooms.len(), 2, "{planted:?}");
            assert_ne!(sequencer(rooms[0]), sequencer(rooms[1]), "seed {seed}: {rooms:?}");
            let planted_in: std::collections::BTreeSet<&str> =
                planted.plants.iter().map(|p| p.process.as_str()).collect();
            assert_eq!(planted_in.into_iter().collect::<Vec<_>>(), workers);
        }
    }

    #[test]
    fn a_seed_always_draws_the_same_cause_and_seeds_reach_every_variant() {
        for challenge in CHALLENGES {
            assert_eq!(challenge.draw(42), challenge.draw(42));
            let drawn: std::collections::BTreeSet<String> = (0..200).map(|s| challenge.draw(s).variant).collect();
            // Every mechanism is drawn.
            assert_eq!(drawn.len(), challenge.variants.len(), "{}", challenge.name);
        }
    }
}
