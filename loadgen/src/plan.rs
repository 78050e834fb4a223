//! Who is in which room: user and room names and the client → rooms membership, derived from
//! the seed so a run can be repeated exactly.
//!
//! Uniform spreads members round-robin (every room gets the same size ±1). Zipf gives room k
//! (from 1) a share of the memberships proportional to 1/k^s, capped at the number of clients,
//! and deals a shuffled client order into the rooms so no client is in a room twice.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::config::RoomDist;

/// The membership plan of one run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Prefix of every user and room name.
    pub prefix: String,
    /// Room names, indexed by room number.
    pub rooms: Vec<String>,
    /// For each client, the rooms it joins.
    pub client_rooms: Vec<Vec<u32>>,
    /// Members per room.
    pub room_sizes: Vec<u32>,
    /// User names given explicitly (a replay); empty means `PREFIX-u<i>`.
    pub users: Vec<String>,
    /// Room numbers by name when the names were given explicitly (a replay); empty means
    /// `PREFIX-r<i>`.
    pub room_names: HashMap<String, u32>,
}

impl Plan {
    /// Builds the plan. `rooms_per_client` must be between 1 and `rooms` (see
    /// [`crate::Config::validate`]).
    pub fn build(
        prefix: &str,
        clients: u32,
        rooms: u32,
        rooms_per_client: u32,
        dist: RoomDist,
        rng: &mut StdRng,
    ) -> Self {
        let (c, r, k) = (clients as usize, rooms as usize, rooms_per_client as usize);
        let mut client_rooms: Vec<Vec<u32>> = vec![Vec::with_capacity(k); c];
        match dist {
            RoomDist::Uniform => {
                for (i, mine) in client_rooms.iter_mut().enumerate() {
                    mine.extend((0..k).map(|j| ((i * k + j) % r) as u32));
                }
            }
            RoomDist::Zipf { s } => {
                let sizes = zipf_sizes((c * k) as u64, r, s, c as u64);
                let mut order: Vec<u32> = (0..clients).collect();
                order.shuffle(rng);
                let mut cursor = 0usize;
                for (room, &size) in sizes.iter().enumerate() {
                    for _ in 0..size {
                        client_rooms[order[cursor % c] as usize].push(room as u32);
                        cursor += 1;
                    }
                }
            }
        }
        let mut room_sizes = vec![0u32; r];
        for mine in &client_rooms {
            for &room in mine {
                room_sizes[room as usize] += 1;
            }
        }
        Self {
            prefix: prefix.to_string(),
            rooms: (0..rooms).map(|i| format!("{prefix}-r{i}")).collect(),
            client_rooms,
            room_sizes,
            users: Vec::new(),
            room_names: HashMap::new(),
        }
    }

    /// A plan with given user and room names and membership (a replayed recording); `prefix`
    /// still names the sends (`client_msg_id`), so it should be unique per run.
    pub fn explicit(prefix: &str, users: Vec<String>, rooms: Vec<String>, client_rooms: Vec<Vec<u32>>) -> Self {
        let mut room_sizes = vec![0u32; rooms.len()];
        for &room in client_rooms.iter().flatten() {
            room_sizes[room as usize] += 1;
        }
        let room_names = rooms.iter().enumerate().map(|(i, name)| (name.clone(), i as u32)).collect();
        Self { prefix: prefix.to_string(), rooms, client_rooms, room_sizes, users, room_names }
    }

    /// Memberships in all (client, room) pairs.
    pub fn memberships(&self) -> u64 {
        self.client_rooms.iter().map(|rooms| rooms.len() as u64).sum()
    }

    /// The user name of client `i`.
    pub fn user(&self, client: u32) -> String {
        if let Some(name) = self.users.get(client as usize) {
            return name.clone();
        }
        format!("{}-u{client}", self.prefix)
    }

    /// Names the rooms `ROOMS-r<i>` instead of after the run's prefix (`--room-prefix`).
    pub fn name_rooms(&mut self, rooms: &str) {
        self.rooms = (0..self.rooms.len()).map(|i| format!("{rooms}-r{i}")).collect();
        self.room_names = self.rooms.iter().enumerate().map(|(i, name)| (name.clone(), i as u32)).collect();
    }

    /// The room number of a room name of this run, if it is one.
    pub fn room_index(&self, name: &str) -> Option<u32> {
        if !self.room_names.is_empty() {
            return self.room_names.get(name).copied();
        }
        let rest = name.strip_prefix(self.prefix.as_str())?.strip_prefix("-r")?;
        let idx: u32 = rest.parse().ok()?;
        ((idx as usize) < self.rooms.len()).then_some(idx)
    }

    /// The `client_msg_id` of send number `i`.
    pub fn client_msg_id(&self, send: u32) -> String {
        format!("{}.{send}", self.prefix)
    }

    /// The send number of a `client_msg_id` of this run, if it is one.
    pub fn send_index(&self, client_msg_id: &str) -> Option<u32> {
        client_msg_id.strip_prefix(self.prefix.as_str())?.strip_prefix('.')?.parse().ok()
    }
}

/// Splits `total` memberships over `rooms` rooms in proportion to 1/k^s (k from 1), no room
/// above `cap`, rounded so the sizes add up to `total` exactly (when `total <= rooms * cap`).
pub fn zipf_sizes(total: u64, rooms: usize, s: f64, cap: u64) -> Vec<u64> {
    let weights: Vec<f64> = (1..=rooms).map(|k| 1.0 / (k as f64).powf(s)).collect();
    let mut sizes = vec![0u64; rooms];
    let mut capped = vec![false; rooms];
    // Water-filling: rooms whose share exceeds the cap are pinned at it, the rest is re-shared.
    let mut shares = vec![0f64; rooms];
    loop {
        let pinned: u64 = capped.iter().filter(|&&c| c).count() as u64 * cap;
        let left = total.saturating_sub(pinned) as f64;
        let free_weight: f64 = (0..rooms).filter(|&i| !capped[i]).map(|i| weights[i]).sum();
        let mut changed = false;
        for i in 0..rooms {
            if capped[i] {
                shares[i] = cap as f64;
            } else {
                shares[i] = if free_weight > 0.0 { left * weights[i] / free_weight } else { 0.0 };
                if shares[i] > cap as f64 {
                    capped[i] = true;
                    changed = true;
                }
            }
        }
        if !changed {
            break;
        }
    }
    // Largest remainder rounding.
    let mut assigned = 0u64;
    for i in 0..rooms {
        sizes[i] = (shares[i].floor() as u64).min(cap);
        assigned += sizes[i];
    }
    let mut order: Vec<usize> = (0..rooms).collect();
    order.sort_by(|&a, &b| {
        let ra = shares[a] - shares[a].floor();
        let rb = shares[b] - shares[b].floor();
        rb.total_cmp(&ra).then(a.cmp(&b))
    });
    let mut remaining = total.saturating_sub(assigned);
    while remaining > 0 {
        let before = remaining;
        for &i in &order {
            if remaining == 0 {
                break;
            }
            if sizes[i] < cap {
                sizes[i] += 1;
                remaining -= 1;
            }
        }
        if remaining == before {
            break; // every room is full
        }
    }
    sizes
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn a_room_prefix_names_the_rooms_and_leaves_users_and_sends_to_the_run() {
        let mut plan = Plan::build("me", 4, 2, 1, RoomDist::Uniform, &mut StdRng::seed_from_u64(1));
        plan.name_rooms("lab");
        assert_eq!(plan.rooms, ["lab-r0", "lab-r1"]);
        assert_eq!(plan.room_index("lab-r1"), Some(1));
        assert_eq!(plan.room_index("me-r1"), None);
        assert_eq!(plan.user(3), "me-u3");
        assert_eq!(plan.client_msg_id(7), "me.7");
    }

    #[test]
    fn zipf_sizes_follow_the_law_and_add_up() {
        let sizes = zipf_sizes(10_000, 100, 1.0, 10_000);
        assert_eq!(sizes.iter().sum::<u64>(), 10_000);
        // Harmonic number H_100 ≈ 5.187: room 1 gets ~1928, room 2 ~964, room 10 ~193.
        assert!((1925..=1931).contains(&sizes[0]), "{}", sizes[0]);
        assert!((962..=966).contains(&sizes[1]), "{}", sizes[1]);
        assert!((191..=195).contains(&sizes[9]), "{}", sizes[9]);
        assert!(sizes.windows(2).all(|w| w[0] >= w[1]), "non-increasing");
    }

    #[test]
    fn zipf_sizes_respect_the_cap() {
        let sizes = zipf_sizes(300, 10, 2.0, 100);
        assert_eq!(sizes.iter().sum::<u64>(), 300);
        assert!(sizes.iter().all(|&s| s <= 100));
        assert_eq!(sizes[0], 100);
        // Full to the brim: every room at the cap.
        assert_eq!(zipf_sizes(1000, 10, 3.0, 100), vec![100; 10]);
    }

    #[test]
    fn plans_are_consistent() {
        for dist in [RoomDist::Uniform, RoomDist::Zipf { s: 1.3 }] {
            let mut rng = StdRng::seed_from_u64(7);
            let plan = Plan::build("t", 1000, 40, 3, dist, &mut rng);
            assert_eq!(plan.room_sizes.iter().map(|&s| s as u64).sum::<u64>(), 3000);
            for rooms in &plan.client_rooms {
                assert_eq!(rooms.len(), 3);
                let mut sorted = rooms.clone();
                sorted.sort_unstable();
                sorted.dedup();
                assert_eq!(sorted.len(), 3, "a client joined a room twice: {rooms:?}");
            }
            if dist == RoomDist::Uniform {
                assert!(plan.room_sizes.iter().all(|&s| s == 75), "{:?}", plan.room_sizes);
            } else {
                assert!(plan.room_sizes[0] > 10 * plan.room_sizes[39]);
            }
        }
        // Same seed, same plan.
        let a = Plan::build("t", 100, 10, 1, RoomDist::Zipf { s: 1.0 }, &mut StdRng::seed_from_u64(1));
        let b = Plan::build("t", 100, 10, 1, RoomDist::Zipf { s: 1.0 }, &mut StdRng::seed_from_u64(1));
        assert_eq!(a.client_rooms, b.client_rooms);
    }

    #[test]
    fn names_round_trip() {
        let plan = Plan::build("lgab", 3, 12, 1, RoomDist::Uniform, &mut StdRng::seed_from_u64(1));
        assert_eq!(plan.room_index("lgab-r11"), Some(11));
        assert_eq!(plan.room_index("lgab-r12"), None);
        assert_eq!(plan.room_index("other-r1"), None);
        assert_eq!(plan.send_index(&plan.client_msg_id(42)), Some(42));
        assert_eq!(plan.send_index("lgab-42"), None);
        assert!(protocol::names::is_valid_room(&plan.rooms[11]));
        assert!(protocol::names::is_valid_user(&plan.user(2)));
    }
}
