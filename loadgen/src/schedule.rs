//! The open-loop schedule: every send, history read and scenario disconnect is fixed in advance
//! at an instant measured from the start of the measured phase.
//!
//! Send `k` of a phase at rate `r` happens at `phase_start + k / r`, whatever the server does.
//! Latency is measured from that scheduled instant, not from when loadgen got round to
//! writing, so a slow server (or a slow loadgen) shows up as latency instead of hiding as a
//! lower send rate (coordinated omission).

use std::time::Duration;

use rand::rngs::StdRng;
use rand::Rng;

use crate::config::ReconnectPlan;
use crate::plan::Plan;

/// A stretch of constant send rate.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Phase {
    /// How long it lasts.
    #[serde(with = "crate::config::secs")]
    pub duration: Duration,
    /// Sends per second over all clients (0 = idle).
    pub rate: f64,
}

/// One scheduled send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedSend {
    /// Microseconds after the start of the measured phase.
    pub at_us: u64,
    /// The sending client.
    pub client: u32,
    /// The room, one of the client's.
    pub room: u32,
}

/// What the scheduler tells a client to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send message number `n` (an index into the send list).
    Send(u32),
    /// Read the newest history page of room `room`.
    History(u32),
    /// Drop the connection abruptly and reconnect.
    Drop,
}

/// A non-send event: history read or disconnect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// Microseconds after the start of the measured phase.
    pub at_us: u64,
    /// Which client.
    pub client: u32,
    /// What it does.
    pub action: Action,
}

/// The instants of every send of the phases, in microseconds from the start, ascending.
pub fn send_instants(phases: &[Phase]) -> Vec<u64> {
    let mut out = Vec::new();
    let mut phase_start = 0f64;
    for p in phases {
        let len = p.duration.as_secs_f64();
        if p.rate > 0.0 {
            let n = (len * p.rate).ceil() as u64;
            for k in 0..n {
                let offset = k as f64 / p.rate;
                if offset >= len {
                    break;
                }
                out.push(((phase_start + offset) * 1e6).round() as u64);
            }
        }
        phase_start += len;
    }
    out
}

/// Assigns each send instant a sender (uniform over clients that have rooms) and one of its
/// rooms (uniform).
pub fn build_sends(phases: &[Phase], plan: &Plan, rng: &mut StdRng) -> Vec<PlannedSend> {
    let senders: Vec<u32> =
        (0..plan.client_rooms.len() as u32).filter(|&c| !plan.client_rooms[c as usize].is_empty()).collect();
    if senders.is_empty() {
        return Vec::new();
    }
    send_instants(phases)
        .into_iter()
        .map(|at_us| {
            let client = senders[rng.random_range(0..senders.len())];
            let rooms = &plan.client_rooms[client as usize];
            PlannedSend { at_us, client, room: rooms[rng.random_range(0..rooms.len())] }
        })
        .collect()
}

/// History reads at a fixed rate over the whole measured phase, from random members.
pub fn build_history(rate: f64, total: Duration, plan: &Plan, rng: &mut StdRng) -> Vec<Event> {
    let phases = [Phase { duration: total, rate }];
    let clients = plan.client_rooms.len();
    send_instants(&phases)
        .into_iter()
        .filter_map(|at_us| {
            let client = rng.random_range(0..clients) as u32;
            let rooms = &plan.client_rooms[client as usize];
            let room = *rooms.get(rng.random_range(0..rooms.len().max(1)))?;
            Some(Event { at_us, client, action: Action::History(room) })
        })
        .collect()
}

/// The disconnects of the reconnect storms that fall within `total`: each storm picks
/// `fraction` of the clients at random and spreads their drops evenly over `spread`.
pub fn build_drops(plan: &ReconnectPlan, clients: u32, total: Duration, rng: &mut StdRng) -> Vec<Event> {
    let mut out = Vec::new();
    let n = ((clients as f64) * plan.fraction).round() as usize;
    let mut at = plan.at;
    while at < total && n > 0 {
        let mut all: Vec<u32> = (0..clients).collect();
        let (chosen, _) = rand::seq::SliceRandom::partial_shuffle(&mut all[..], rng, n);
        for (i, &client) in chosen.iter().enumerate() {
            let offset = plan.spread.as_secs_f64() * i as f64 / n as f64;
            let at_us = ((at.as_secs_f64() + offset) * 1e6) as u64;
            out.push(Event { at_us, client, action: Action::Drop });
        }
        match plan.every {
            Some(every) => at += every,
            None => break,
        }
    }
    out.sort_by_key(|e| e.at_us);
    out
}

/// The body size of send `n`: fixed, or drawn deterministically from `min..=max`.
pub fn body_len(n: u32, min: usize, max: usize, seed: u64) -> usize {
    if min >= max {
        return min;
    }
    let span = (max - min + 1) as u64;
    min + (mix(seed ^ n as u64) % span) as usize
}

/// splitmix64's finaliser: a cheap, well-spread hash.
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RoomDist;
    use rand::SeedableRng;

    fn p(secs: f64, rate: f64) -> Phase {
        Phase { duration: Duration::from_secs_f64(secs), rate }
    }

    #[test]
    fn instants_are_fixed_and_evenly_spaced() {
        let t = send_instants(&[p(1.0, 4.0)]);
        assert_eq!(t, vec![0, 250_000, 500_000, 750_000]);
        // Phases follow each other; an idle phase shifts the next one.
        let t = send_instants(&[p(0.5, 2.0), p(1.0, 0.0), p(0.25, 8.0)]);
        assert_eq!(t, vec![0, 1_500_000, 1_625_000]);
        // Non-integer rates: 2.5/s over 2 s is 5 sends, 0.4 s apart.
        let t = send_instants(&[p(2.0, 2.5)]);
        assert_eq!(t, vec![0, 400_000, 800_000, 1_200_000, 1_600_000]);
        // A high rate keeps its exact count.
        assert_eq!(send_instants(&[p(3.0, 10_000.0)]).len(), 30_000);
    }

    #[test]
    fn sends_go_to_members_and_repeat_with_the_seed() {
        let plan = Plan::build("t", 50, 5, 2, RoomDist::Uniform, &mut StdRng::seed_from_u64(1));
        let a = build_sends(&[p(1.0, 1000.0)], &plan, &mut StdRng::seed_from_u64(3));
        let b = build_sends(&[p(1.0, 1000.0)], &plan, &mut StdRng::seed_from_u64(3));
        assert_eq!(a, b);
        assert_eq!(a.len(), 1000);
        for s in &a {
            assert!(plan.client_rooms[s.client as usize].contains(&s.room));
        }
        let senders: std::collections::HashSet<u32> = a.iter().map(|s| s.client).collect();
        assert!(senders.len() > 40, "senders spread over clients: {}", senders.len());
    }

    #[test]
    fn storms_drop_the_right_share() {
        let plan = ReconnectPlan {
            at: Duration::from_secs(1),
            every: Some(Duration::from_secs(2)),
            fraction: 0.5,
            spread: Duration::from_millis(100),
            resume: true,
        };
        let drops = build_drops(&plan, 10, Duration::from_secs(4), &mut StdRng::seed_from_u64(1));
        assert_eq!(drops.len(), 10, "two storms (1 s and 3 s) of 5 clients");
        assert!(drops[..5].iter().all(|d| (1_000_000..1_100_000).contains(&d.at_us)));
        assert!(drops[5..].iter().all(|d| (3_000_000..3_100_000).contains(&d.at_us)));
        let first: std::collections::HashSet<u32> = drops[..5].iter().map(|d| d.client).collect();
        assert_eq!(first.len(), 5, "distinct clients within a storm");
    }

    #[test]
    fn body_lengths_stay_in_range() {
        assert_eq!(body_len(5, 100, 100, 1), 100);
        let lens: Vec<usize> = (0..1000).map(|n| body_len(n, 10, 20, 9)).collect();
        assert!(lens.iter().all(|&l| (10..=20).contains(&l)));
        assert!(lens.contains(&10) && lens.contains(&20));
    }
}
