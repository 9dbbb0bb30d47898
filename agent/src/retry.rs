//! Reaching the coordinator: exponential backoff with jitter, so that a worker started before
//! its coordinator (pods start in any order) waits for it, and many workers that lost it do not
//! retry in lockstep.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::time::{Duration, Instant};

/// The first wait.
pub const FIRST: Duration = Duration::from_millis(200);
/// The longest wait.
pub const MAX: Duration = Duration::from_secs(10);

/// Waits that double from `first` up to `max`; each is drawn uniformly from [base/2, base]
/// ("equal jitter"): never less than half the schedule, never more than it.
pub struct Backoff {
    base: Duration,
    first: Duration,
    max: Duration,
    /// Retries since the last reset.
    pub retries: u32,
    rng: u64,
}

impl Backoff {
    pub fn new(first: Duration, max: Duration) -> Backoff {
        // Seeded per process (RandomState is randomly keyed), so workers draw apart.
        let rng = RandomState::new().hash_one(std::process::id()) | 1;
        Backoff { base: first, first, max: max.max(first), retries: 0, rng }
    }

    /// The next wait.
    pub fn next_delay(&mut self) -> Duration {
        let base = self.base;
        self.base = (self.base * 2).min(self.max);
        self.retries += 1;
        // xorshift64: enough to spread workers apart; nothing secret depends on it.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let unit = (self.rng >> 11) as f64 / (1u64 << 53) as f64;
        base.mul_f64(0.5 + 0.5 * unit)
    }

    /// Back to the first wait (after a success).
    pub fn reset(&mut self) {
        self.base = self.first;
        self.retries = 0;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(FIRST, MAX)
    }
}

/// The wait before the next try, or `None` when `deadline` leaves no time for it. A deadline
/// nearer than the drawn wait gets the remainder, so the last try is made at the deadline.
pub fn wait_within(backoff: &mut Backoff, deadline: Option<Instant>) -> Option<Duration> {
    let wait = backoff.next_delay();
    match deadline {
        None => Some(wait),
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now());
            (!left.is_zero()).then(|| wait.min(left))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_to_the_cap_with_jitter_in_the_upper_half() {
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let mut schedule = Vec::new();
        let mut base = 0.2f64;
        for _ in 0..12 {
            let d = b.next_delay().as_secs_f64();
            assert!(d >= base / 2.0 - 1e-9 && d <= base + 1e-9, "{d} outside [{}, {base}]", base / 2.0);
            schedule.push(base);
            base = (base * 2.0).min(10.0);
        }
        assert_eq!(schedule[..7], [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0]);
        assert_eq!(b.retries, 12);
        b.reset();
        let d = b.next_delay();
        assert!(d >= Duration::from_millis(100) && d <= Duration::from_millis(200), "{d:?}");
    }

    #[test]
    fn jitter_spreads_over_the_range() {
        // At the cap, 1000 draws must cover [5 s, 10 s] well: both ends' tenths are hit and the
        // mean is near 7.5 s.
        let mut b = Backoff::new(Duration::from_secs(10), Duration::from_secs(10));
        let draws: Vec<f64> = (0..1000).map(|_| b.next_delay().as_secs_f64()).collect();
        assert!(draws.iter().all(|&d| (5.0..=10.0).contains(&d)));
        assert!(draws.iter().any(|&d| d < 5.5) && draws.iter().any(|&d| d > 9.5));
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        assert!((mean - 7.5).abs() < 0.3, "mean {mean}");
        // Two workers started together do not wait alike.
        let (mut x, mut y) = (Backoff::default(), Backoff::default());
        x.rng = 0x9e37_79b9_7f4a_7c15;
        y.rng = 0x2545_f491_4f6c_dd1d;
        assert!((0..5).any(|_| x.next_delay() != y.next_delay()));
    }

    #[test]
    fn a_deadline_cuts_the_last_wait_and_then_stops() {
        let mut b = Backoff::new(Duration::from_secs(5), Duration::from_secs(10));
        let soon = Instant::now() + Duration::from_millis(300);
        assert!(wait_within(&mut b, Some(soon)).unwrap() <= Duration::from_millis(300));
        assert_eq!(wait_within(&mut b, Some(Instant::now())), None);
        assert!(wait_within(&mut b, None).is_some());
    }
}
