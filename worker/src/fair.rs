//! Weighted fair turns between tenants' lanes (docs/adr/0041).
//!
//! A tenant with a `[tenants.<name>]` table has a lane of its own (one queue
//! per tier, [`shoal_shared::broker::Topology::lanes`]); every other tenant
//! shares one. Priority stays strict across tiers (ADR 0001): a slot looks
//! at `high` before `normal` before `low`. Within a tier it tries the lanes
//! in start-time fair queuing order: each lane has a virtual finish tag that
//! a task taken from it advances by `1 / weight`, and the lane whose next
//! task would start earliest goes first. Under backlog the lanes are served
//! in proportion to their weights, so a tenant with 10,000 queued tasks
//! does not hold back one with 10.
//!
//! A lane that was idle starts again at the current virtual time: it gets
//! its fair share from now on, not credit for the time it had nothing to do.
//! A lane a get just found empty goes to the end of its tier's order for
//! [`LANE_RECHECK`], so a backlog in one lane does not cost a get on every
//! empty lane per task; the end of the order is still tried when the others
//! are empty, so nothing is skipped, only looked at later.
//!
//! The turns are the worker's own (no broker or Redis operation): each
//! worker gives every lane its weighted share of its slots, so the fleet
//! does too.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use shoal_shared::broker::Topology;
use shoal_shared::task::Priority;
use tokio::time::Instant;

/// How long a lane a get found empty waits at the end of its tier's order.
pub const LANE_RECHECK: Duration = Duration::from_millis(500);

/// The lanes' turns of one worker, shared by its slots: one set of turns
/// per tier, so a look at an empty higher tier never shifts the turns of
/// the tier that has the work.
pub struct Fair {
    tiers: Vec<Mutex<Tier>>,
    /// Each lane's `1 / weight`: how far a task taken moves its tag.
    costs: Vec<f64>,
}

struct Tier {
    /// Per lane: the virtual time its last taken task finishes.
    finish: Vec<f64>,
    /// Per lane: until when a get found it empty.
    empty_until: Vec<Option<Instant>>,
    /// The start tag of the task taken last (start-time fair queuing's
    /// virtual time).
    now: f64,
}

impl Fair {
    /// Turns for lanes of these weights (0 counts as 1) over `tiers` tiers.
    pub fn new(weights: impl IntoIterator<Item = u32>, tiers: usize) -> Self {
        let costs: Vec<f64> = weights
            .into_iter()
            .map(|weight| 1.0 / f64::from(weight.max(1)))
            .collect();
        let tiers = (0..tiers)
            .map(|_| {
                Mutex::new(Tier {
                    finish: vec![0.0; costs.len()],
                    empty_until: vec![None; costs.len()],
                    now: 0.0,
                })
            })
            .collect();
        Self { tiers, costs }
    }

    /// Turns for the lanes of `topology`, over every priority tier.
    pub fn for_topology(topology: &Topology) -> Arc<Self> {
        Arc::new(Self::new(
            topology.lanes().iter().map(|lane| lane.weight),
            Priority::ALL.len(),
        ))
    }

    /// The lane of tier `tier` a slot tries next at `at`, of those it has
    /// not tried in this look (`tried`): lanes not lately found empty
    /// first, each group by the virtual time its next task would start
    /// (then by index). The turn is charged at once, so slots looking at
    /// the same moment spread over the lanes; [`Fair::empty`] gives it back.
    pub fn pick(&self, tier: usize, at: Instant, tried: &[usize]) -> Option<usize> {
        let mut state = self.tiers.get(tier)?.lock().expect("fair state");
        let now = state.now;
        let (_, start, lane) = (0..self.costs.len())
            .filter(|lane| !tried.contains(lane))
            .map(|lane| {
                let empty = state.empty_until[lane].is_some_and(|until| at < until);
                (empty, state.finish[lane].max(now), lane)
            })
            .min_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)).then(a.2.cmp(&b.2)))?;
        state.finish[lane] = start + self.costs[lane];
        state.now = start;
        Some(lane)
    }

    /// The get of a picked `lane` in tier `tier` found it empty at `at`:
    /// its turn is given back, and it waits at the end of the tier's order
    /// for [`LANE_RECHECK`].
    pub fn empty(&self, tier: usize, lane: usize, at: Instant) {
        let Some(tier) = self.tiers.get(tier) else {
            return;
        };
        let mut state = tier.lock().expect("fair state");
        if lane < self.costs.len() {
            state.finish[lane] -= self.costs[lane];
            state.empty_until[lane] = Some(at + LANE_RECHECK);
        }
    }

    /// The get of a picked `lane` in tier `tier` returned a task: a mark of
    /// emptiness there is out of date.
    pub fn taken(&self, tier: usize, lane: usize) {
        if let Some(tier) = self.tiers.get(tier) {
            if let Some(until) = tier.lock().expect("fair state").empty_until.get_mut(lane) {
                *until = None;
            }
        }
    }

    /// How many lanes there are.
    pub fn lanes(&self) -> usize {
        self.costs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The order a slot would try tier `tier`'s lanes in at `at` (each
    /// pick charged, then given back as if empty, without the mark).
    fn order(fair: &Fair, tier: usize, at: Instant) -> Vec<usize> {
        let (saved, now) = {
            let state = fair.tiers[tier].lock().unwrap();
            (state.finish.clone(), state.now)
        };
        let mut tried = Vec::new();
        while let Some(lane) = fair.pick(tier, at, &tried) {
            tried.push(lane);
        }
        let mut state = fair.tiers[tier].lock().unwrap();
        state.finish = saved;
        state.now = now;
        tried
    }

    /// Takes `n` tasks from tier 0 where every lane has work, returning how
    /// many each lane got.
    fn shares(fair: &Fair, n: usize) -> Vec<usize> {
        let at = Instant::now();
        let mut got = vec![0; fair.lanes()];
        for _ in 0..n {
            let lane = fair.pick(0, at, &[]).expect("a lane");
            fair.taken(0, lane);
            got[lane] += 1;
        }
        got
    }

    #[test]
    fn backlogged_lanes_are_served_in_proportion_to_their_weights() {
        assert_eq!(shares(&Fair::new([1, 1], 3), 100), vec![50, 50]);
        assert_eq!(shares(&Fair::new([3, 1], 3), 100), vec![75, 25]);
        assert_eq!(shares(&Fair::new([1, 2, 5], 3), 80), vec![10, 20, 50]);
    }

    #[test]
    fn looks_at_an_empty_higher_tier_do_not_shift_the_turns_below() {
        let fair = Fair::new([1, 1, 1], 3);
        let at = Instant::now();
        let mut got = [0; 3];
        for _ in 0..60 {
            // One slot looks at tier 0, empty, while another takes from
            // tier 1; the first look is given back after the take.
            let high = fair.pick(0, at, &[]).unwrap();
            let lane = fair.pick(1, at, &[]).unwrap();
            fair.taken(1, lane);
            got[lane] += 1;
            fair.empty(0, high, at - LANE_RECHECK);
        }
        assert_eq!(got, [20, 20, 20]);
    }

    #[test]
    fn slots_looking_at_the_same_moment_alternate_between_equal_lanes() {
        // Four slots pick before any get answers: the turns are charged at
        // the pick, so they spread over both lanes.
        let fair = Fair::new([1, 1], 3);
        let at = Instant::now();
        let picks: Vec<usize> = (0..6).map(|_| fair.pick(0, at, &[]).unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 0, 1, 0, 1]);
    }

    #[test]
    fn a_lane_back_from_idle_gets_its_share_not_a_burst_of_credit() {
        let fair = Fair::new([1, 1], 3);
        let at = Instant::now();
        // Lane 1 has nothing while lane 0 runs 1,000 tasks alone.
        for _ in 0..1000 {
            let lane = fair.pick(0, at, &[]).unwrap();
            if lane == 1 {
                fair.empty(0, 1, at - LANE_RECHECK);
                assert_eq!(fair.pick(0, at, &[1]), Some(0));
            }
        }
        // Lane 1 has work again: it alternates with lane 0 from now on
        // rather than taking the next 1,000 turns.
        let turns: Vec<usize> = (0..6).map(|_| fair.pick(0, at, &[]).unwrap()).collect();
        assert_eq!(turns.iter().filter(|l| **l == 1).count(), 3, "{turns:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_lane_found_empty_is_tried_last_in_its_tier_until_the_recheck() {
        let fair = Fair::new([1, 1, 1], 3);
        let at = Instant::now();
        assert_eq!(fair.pick(1, at, &[]), Some(0));
        fair.empty(1, 0, at);
        // Last in tier 1, but still tried; other tiers are unaffected.
        assert_eq!(order(&fair, 1, at), vec![1, 2, 0]);
        assert_eq!(order(&fair, 0, at), vec![0, 1, 2]);
        // After the recheck it is back in its fair place.
        tokio::time::advance(LANE_RECHECK).await;
        assert_eq!(order(&fair, 1, Instant::now()), vec![0, 1, 2]);
        // A take from it clears the mark at once.
        fair.empty(1, 0, Instant::now());
        assert_eq!(order(&fair, 1, Instant::now()), vec![1, 2, 0]);
        fair.taken(1, 0);
        assert_eq!(order(&fair, 1, Instant::now()), vec![0, 1, 2]);
    }
}
