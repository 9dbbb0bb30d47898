//! Goodput: how much of a job's wall time went into steps that it kept.
//!
//! Per job, from the first attempt's start to the job's end (or now): productive step time
//! (steps kept, timed by rank 0's progress), failures, steps lost (done again because the next
//! attempt resumed from an earlier step than rank 0 had reported) and the time spent recovering
//! (from the moment a failure ended an attempt to the next attempt's first reported step).
//!
//! Soft state, like the live step: it is built from the scheduler's events in memory and starts
//! again from zero when the coordinator restarts.

use std::collections::HashMap;
use std::sync::Mutex;

/// A job's goodput figures, as `status` shows them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Goodput {
    /// Wall time of steps that were kept.
    pub productive_ms: i64,
    /// From the first attempt's start to the job's end, or to now.
    pub wall_ms: i64,
    /// Attempts that ended in a failure.
    pub failures: u32,
    pub steps_lost: u64,
    /// From each failure to the next attempt's first step, summed (a recovery still under way
    /// counts up to now).
    pub recovering_ms: i64,
}

impl Goodput {
    /// Productive time over wall time, 0..1 (0 before any step).
    pub fn ratio(&self) -> f64 {
        if self.wall_ms <= 0 { 0.0 } else { (self.productive_ms as f64 / self.wall_ms as f64).clamp(0.0, 1.0) }
    }
}

/// rank 0's progress within the current attempt: (step, when it was reported).
#[derive(Clone, Copy, Debug, Default)]
struct Attempt {
    started_ms: i64,
    resume_step: u64,
    first: Option<(u64, i64)>,
    last: Option<(u64, i64)>,
    /// The most steps a member said it had completed (when it reported a failure).
    reached: u64,
}

impl Attempt {
    /// Milliseconds per step, from the attempt's reports.
    fn step_ms(&self) -> Option<f64> {
        match (self.first, self.last) {
            (Some((s0, t0)), Some((s1, t1))) if s1 > s0 => Some((t1 - t0) as f64 / (s1 - s0) as f64),
            (Some((s0, t0)), _) if s0 > self.resume_step => {
                Some((t0 - self.started_ms) as f64 / (s0 - self.resume_step) as f64)
            }
            _ => None,
        }
    }

    /// The time of the steps done so far: steps since the resume times the rate.
    fn productive_ms(&self) -> f64 {
        let done = self.last.map_or(0, |(s, _)| s.saturating_sub(self.resume_step));
        self.step_ms().map_or(0.0, |ms| ms * done as f64)
    }
}

/// Between two attempts: since when, the step rank 0 had reached, the ended attempt's time per
/// step, and whether a failure ended it (then the gap is recovery time).
#[derive(Clone, Copy, Debug)]
struct Gap {
    at_ms: i64,
    reached: u64,
    step_ms: f64,
    failed: bool,
}

#[derive(Clone, Debug, Default)]
struct Tracker {
    first_started_ms: Option<i64>,
    ended_ms: Option<i64>,
    totals: Goodput,
    /// Productive time of attempts that have ended, less the steps later lost.
    kept_ms: f64,
    current: Attempt,
    /// Set from an attempt's end to the next attempt's first step.
    gap: Option<Gap>,
}

/// The goodput trackers of the jobs, fed by the job manager and the scheduler.
#[derive(Default)]
pub struct Book {
    jobs: Mutex<HashMap<String, Tracker>>,
}

impl Book {
    fn with<T>(&self, id: &str, f: impl FnOnce(&mut Tracker) -> T) -> T {
        let mut jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        f(jobs.entry(id.to_owned()).or_default())
    }

    /// An attempt started, resuming at `resume_step`: steps reached before it are lost.
    pub fn attempt_started(&self, id: &str, resume_step: u64, now: i64) {
        self.with(id, |t| {
            t.first_started_ms.get_or_insert(now);
            if let Some(g) = &mut t.gap {
                let lost = g.reached.saturating_sub(resume_step);
                t.totals.steps_lost += lost;
                t.kept_ms = (t.kept_ms - lost as f64 * g.step_ms).max(0.0);
                // Counted once, even if this attempt too ends before its first step.
                g.reached = resume_step;
            }
            t.current = Attempt { started_ms: now, resume_step, ..Attempt::default() };
        })
    }

    /// Rank 0 reported `step` of the current attempt.
    pub fn progress(&self, id: &str, step: u64, now: i64) {
        self.with(id, |t| {
            if t.current.first.is_none() {
                t.current.first = Some((step, now));
                if let Some(g) = t.gap.take()
                    && g.failed
                {
                    t.totals.recovering_ms += (now - g.at_ms).max(0);
                }
            }
            if t.current.last.is_none_or(|(s, _)| step > s) {
                t.current.last = Some((step, now));
            }
        })
    }

    /// A member of the current attempt had completed `step` steps.
    pub fn reached(&self, id: &str, step: u64) {
        self.with(id, |t| t.current.reached = t.current.reached.max(step))
    }

    /// The current attempt ended; `failed`: by a failure (the job runs again).
    pub fn attempt_ended(&self, id: &str, failed: bool, now: i64) {
        self.with(id, |t| {
            t.kept_ms += t.current.productive_ms();
            let reported = t.current.last.map_or(t.current.resume_step, |(s, _)| s);
            let reached = reported.max(t.current.reached);
            let step_ms = t.current.step_ms().or(t.gap.map(|g| g.step_ms)).unwrap_or(0.0);
            t.totals.failures += u32::from(failed);
            // An attempt that ended before its first step extends the gap before it.
            t.gap = Some(match t.gap {
                Some(g) => Gap { reached: g.reached.max(reached), step_ms, failed: g.failed || failed, ..g },
                None => Gap { at_ms: now, reached, step_ms, failed },
            });
            t.current = Attempt::default();
        })
    }

    /// The job reached a terminal state.
    pub fn job_ended(&self, id: &str, now: i64) {
        self.with(id, |t| {
            t.ended_ms.get_or_insert(now);
        })
    }

    /// The job's figures now; `None` before its first attempt (since this coordinator started).
    pub fn get(&self, id: &str, now: i64) -> Option<Goodput> {
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        let t = jobs.get(id)?;
        let start = t.first_started_ms?;
        let end = t.ended_ms.unwrap_or(now);
        let mut g = t.totals;
        g.wall_ms = (end - start).max(0);
        g.productive_ms = ((t.kept_ms + t.current.productive_ms()) as i64).min(g.wall_ms);
        if let Some(gap) = t.gap.filter(|g| g.failed && t.ended_ms.is_none()) {
            g.recovering_ms += (now - gap.at_ms).max(0);
        }
        Some(g)
    }

    /// Forget a deleted job.
    pub fn forget(&self, id: &str) {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 10 steps at 100 ms from step 0; a failure at step 10 (reported at 1000 ms); recovery from
    /// step 4 (a checkpoint) with the first step 500 ms after the failure; 10 more steps.
    #[test]
    fn a_failure_costs_its_lost_steps_and_its_recovery() {
        let b = Book::default();
        b.attempt_started("j", 0, 0);
        for s in 1..=10 {
            b.progress("j", s, 100 * s as i64);
        }
        let g = b.get("j", 1000).unwrap();
        assert_eq!((g.productive_ms, g.wall_ms, g.failures, g.steps_lost), (1000, 1000, 0, 0));
        b.attempt_ended("j", true, 1000);
        b.attempt_started("j", 4, 1200);
        let g = b.get("j", 1400).unwrap();
        assert_eq!((g.failures, g.steps_lost, g.productive_ms, g.recovering_ms), (1, 6, 400, 400));
        for s in 5..=14 {
            b.progress("j", s, 1500 + 100 * (s as i64 - 5));
        }
        b.attempt_ended("j", false, 2400);
        b.job_ended("j", 2400);
        let g = b.get("j", 9999).unwrap();
        // Kept: steps 1-4 (400 ms) and 5-14 (10 steps at 100 ms).
        assert_eq!((g.wall_ms, g.productive_ms, g.recovering_ms, g.steps_lost), (2400, 1400, 500, 6));
        assert!((g.ratio() - 1400.0 / 2400.0).abs() < 1e-12);
    }

    /// Recovery from a peer's state at the step reached loses nothing.
    #[test]
    fn resuming_where_the_failure_happened_loses_no_step() {
        let b = Book::default();
        b.attempt_started("j", 0, 0);
        for s in 1..=8 {
            b.progress("j", s, 50 * s as i64);
        }
        b.attempt_ended("j", true, 420);
        b.attempt_started("j", 8, 430);
        b.progress("j", 9, 500);
        let g = b.get("j", 500).unwrap();
        assert_eq!((g.failures, g.steps_lost, g.recovering_ms), (1, 0, 80));
        assert!(b.get("other", 500).is_none());
    }

    /// Progress reports lag (rank 0 sends at most every 250 ms): the step a survivor reports
    /// with its failure counts as reached, so a resume from an older checkpoint shows its loss.
    #[test]
    fn a_survivors_reported_step_counts_as_reached() {
        let b = Book::default();
        b.attempt_started("j", 0, 0);
        b.progress("j", 5, 100);
        b.reached("j", 19);
        b.attempt_ended("j", true, 400);
        b.attempt_started("j", 10, 450);
        assert_eq!(b.get("j", 450).unwrap().steps_lost, 9);
    }
}
