//! What `submit --watch`, `watch` and `train --workers` show while a job runs. `View` folds the
//! Watch stream into a state and renders it as text lines (pure, so the frames are unit-tested);
//! `Display` draws those frames as a live indicatif bar on a terminal, or prints one plain line
//! per event when stderr is a pipe or a file (logs, CI, scripts that read the lines).

use std::collections::BTreeMap;
use std::io::IsTerminal;

use proto::v1;
use proto::v1::watch_job_response::Event;

/// Cells of the drawn bar.
const BAR_WIDTH: usize = 30;

/// A job as far as its Watch stream has told.
#[derive(Default)]
pub struct View {
    job: Option<v1::Job>,
    progress: Option<v1::Progress>,
    eval: Option<v1::EvalMetrics>,
    /// The last event of each rank.
    workers: BTreeMap<u32, v1::WorkerEvent>,
}

impl View {
    /// Folds one event in; returns the lines worth keeping above the live frame: state changes,
    /// restarts, failures, evaluations and worker events (progress only moves the frame).
    pub fn apply(&mut self, event: &Event) -> Vec<String> {
        let mut lines = Vec::new();
        match event {
            Event::Job(j) => {
                let before = self.job.as_ref();
                if before.is_none_or(|b| b.state != j.state) {
                    lines.push(job_change(j));
                }
                if let Some(b) = before.filter(|b| j.restarts > b.restarts) {
                    let was = self.progress.as_ref().map_or(b.step, |p| p.step);
                    let why = if j.reason.is_empty() { String::new() } else { format!(": {}", j.reason) };
                    lines.push(format!(
                        "{} restarted (restart {}, was at step {was}; newest checkpoint step {}){why}",
                        j.id, j.restarts, j.checkpoint_step
                    ));
                }
                // A new attempt starts over from its checkpoint with a new gang: the old
                // progress and ranks mean nothing now.
                if before.is_some_and(|b| j.restarts != b.restarts) {
                    self.workers.clear();
                    self.progress = None;
                }
                self.job = Some(j.clone());
            }
            Event::Progress(p) => self.progress = Some(*p),
            Event::Eval(e) => {
                lines.push(eval_line(e));
                self.eval = Some(*e);
            }
            Event::Worker(w) => {
                lines.push(worker_line(w));
                self.workers.insert(w.rank, w.clone());
            }
        }
        lines
    }

    /// The live frame: job and state; step/total with a bar; loss, lr, tokens/s and ETA; the
    /// last evaluation; one line per rank with its worker and last event.
    pub fn frame(&self) -> Vec<String> {
        let (id, state) = self.job.as_ref().map_or(("job", "CONNECTING"), |j| (j.id.as_str(), state_name(j)));
        // Progress is newer than the job record, which changes only with the job's state.
        let (step, total) = match (&self.progress, &self.job) {
            (Some(p), j) if j.as_ref().is_none_or(|j| p.step >= j.step) => (p.step, p.total_steps),
            (_, Some(j)) => (j.step, j.total_steps),
            (_, None) => (0, 0),
        };
        let mut out =
            vec![format!("{id} {state:<9} step {step}/{total} [{}] {:>3}%", bar(step, total), percent(step, total))];
        match &self.progress {
            Some(p) => out.push(format!(
                "  loss {:.4}  lr {:.2e}  {:.0} tok/s  eta {}",
                p.loss,
                p.lr,
                p.tokens_per_s,
                duration(p.eta_s)
            )),
            None => out.push("  loss -  lr -  tok/s -  eta -".to_owned()),
        }
        if let Some(e) = &self.eval {
            out.push(format!("  {}", eval_line(e)));
        }
        // As of the job's last state change; shown once a failure has cost something.
        if let Some(g) = self.job.as_ref().and_then(|j| j.goodput).filter(|g| g.failures > 0) {
            out.push(format!(
                "  goodput {:.1}%  failures {}  steps lost {}  recovering {:.1} s",
                100.0 * g.ratio,
                g.failures,
                g.steps_lost,
                g.recovering_s
            ));
        }
        for w in self.workers.values() {
            let msg = if w.message.is_empty() { String::new() } else { format!("  {}", w.message) };
            out.push(format!("  rank {:<3} {:<20} {}{msg}", w.rank, w.worker_id, kind_name(w.kind())));
        }
        out
    }
}

/// One line per event for a stderr that is not a terminal.
pub fn plain_line(event: &Event) -> String {
    match event {
        Event::Job(j) => job_change(j),
        Event::Progress(p) => format!(
            "step {}/{} loss {:.4} lr {:.3e} {:.0} tok/s eta {:.0}s",
            p.step, p.total_steps, p.loss, p.lr, p.tokens_per_s, p.eta_s
        ),
        Event::Eval(e) => eval_line(e),
        Event::Worker(w) => worker_line(w),
    }
}

/// Draws a job's events on stderr as they arrive.
pub enum Display {
    Quiet,
    Lines,
    Live { bar: indicatif::ProgressBar, view: Box<View> },
}

impl Display {
    /// Live when stderr is a terminal, plain lines otherwise; nothing when `print` is false.
    pub fn new(print: bool) -> Self {
        if !print {
            return Display::Quiet;
        }
        if !std::io::stderr().is_terminal() {
            return Display::Lines;
        }
        let bar = indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
        bar.set_style(indicatif::ProgressStyle::with_template("{msg}").expect("static template"));
        let view = Box::<View>::default();
        bar.set_message(view.frame().join("\n"));
        Display::Live { bar, view }
    }

    pub fn show(&mut self, event: &Event) {
        match self {
            Display::Quiet => {}
            Display::Lines => eprintln!("{}", plain_line(event)),
            Display::Live { bar, view } => {
                for line in view.apply(event) {
                    bar.println(line);
                }
                bar.set_message(view.frame().join("\n"));
            }
        }
    }

    /// Leaves the last frame on screen.
    pub fn finish(&self) {
        if let Display::Live { bar, .. } = self {
            bar.finish();
        }
    }
}

impl Drop for Display {
    fn drop(&mut self) {
        self.finish();
    }
}

pub fn state_name(j: &v1::Job) -> &'static str {
    match j.state() {
        v1::JobState::Unspecified => "UNSPECIFIED",
        v1::JobState::Pending => "PENDING",
        v1::JobState::Running => "RUNNING",
        v1::JobState::Succeeded => "SUCCEEDED",
        v1::JobState::Failed => "FAILED",
        v1::JobState::Cancelled => "CANCELLED",
    }
}

fn kind_name(k: v1::WorkerEventKind) -> &'static str {
    match k {
        v1::WorkerEventKind::Unspecified => "UNSPECIFIED",
        v1::WorkerEventKind::Joined => "JOINED",
        v1::WorkerEventKind::Left => "LEFT",
        v1::WorkerEventKind::Failed => "FAILED",
        v1::WorkerEventKind::Lost => "LOST",
        v1::WorkerEventKind::Checkpoint => "CHECKPOINT",
    }
}

fn job_change(j: &v1::Job) -> String {
    let why = if j.reason.is_empty() { String::new() } else { format!(": {}", j.reason) };
    format!("{} {} step {}/{}{why}", j.id, state_name(j), j.step, j.total_steps)
}

fn eval_line(e: &v1::EvalMetrics) -> String {
    let metric = |name: &str, v: Option<f32>| v.map(|v| format!(" {name} {v:.2}")).unwrap_or_default();
    let collapsed = e.identical_share.is_some_and(|s| s as f64 > worker::evaluate::COLLAPSE_SHARE);
    format!(
        "eval step {} loss {:.4}{}{}{}{}{}{}",
        e.step,
        e.loss,
        metric("bleu", e.bleu),
        metric("rouge1", e.rouge1),
        metric("rouge2", e.rouge2),
        metric("rougeL", e.rouge_l),
        metric("identical", e.identical_share),
        if collapsed { " WARNING: most generations are identical (collapse)" } else { "" }
    )
}

fn worker_line(w: &v1::WorkerEvent) -> String {
    let msg = if w.message.is_empty() { String::new() } else { format!(": {}", w.message) };
    format!("worker {} rank {} {}{msg}", w.worker_id, w.rank, kind_name(w.kind()))
}

fn bar(step: u64, total: u64) -> String {
    let wide = (u128::from(step.min(total)) * BAR_WIDTH as u128).checked_div(u128::from(total));
    let filled = wide.map_or(0, |f| f as usize);
    let mut s = "=".repeat(filled);
    if filled < BAR_WIDTH {
        s.push(if filled > 0 { '>' } else { ' ' });
        s.push_str(&" ".repeat(BAR_WIDTH - filled - 1));
    }
    s
}

fn percent(step: u64, total: u64) -> u64 {
    // u128: no overflow whatever total a coordinator reports.
    (u128::from(step.min(total)) * 100).checked_div(u128::from(total)).map_or(0, |p| p as u64)
}

/// Seconds as "42s", "3m05s" or "2h07m".
pub fn duration(secs: f64) -> String {
    if !secs.is_finite() || secs < 0.0 {
        return "?".to_owned();
    }
    let s = secs.round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// How long ago `then_ms` was, as "12s ago", "5m ago", "3h ago" or "2d ago".
pub fn age(then_ms: i64, now_ms: i64) -> String {
    if then_ms <= 0 {
        return "-".to_owned();
    }
    let s = (now_ms - then_ms).max(0) / 1000;
    match s {
        0..60 => format!("{s}s ago"),
        60..3600 => format!("{}m ago", s / 60),
        3600..86400 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(state: v1::JobState, step: u64, restarts: u32) -> Event {
        let mut j = v1::Job { id: "job-7".into(), step, total_steps: 10, restarts, ..Default::default() };
        j.set_state(state);
        Event::Job(j)
    }

    fn progress(step: u64) -> Event {
        Event::Progress(v1::Progress {
            step,
            total_steps: 10,
            loss: 2.5 - step as f32 * 0.1,
            lr: 1e-3,
            tokens_per_s: 812.4,
            eta_s: (10 - step) as f64 * 1.6,
        })
    }

    fn worker(rank: u32, id: &str, kind: v1::WorkerEventKind, message: &str) -> Event {
        let mut w = v1::WorkerEvent { worker_id: id.into(), rank, message: message.into(), ..Default::default() };
        w.set_kind(kind);
        Event::Worker(w)
    }

    #[test]
    fn frames_follow_a_job_through_its_events() {
        let mut v = View::default();
        assert_eq!(v.frame()[0], format!("job CONNECTING step 0/0 [{}]   0%", " ".repeat(30)));

        assert_eq!(v.apply(&job(v1::JobState::Pending, 0, 0)), ["job-7 PENDING step 0/10"]);
        assert_eq!(v.apply(&job(v1::JobState::Running, 0, 0)), ["job-7 RUNNING step 0/10"]);
        assert_eq!(v.apply(&worker(1, "w-b", v1::WorkerEventKind::Joined, "")), ["worker w-b rank 1 JOINED"]);
        assert_eq!(v.apply(&worker(0, "w-a", v1::WorkerEventKind::Joined, "")), ["worker w-a rank 0 JOINED"]);
        assert!(v.apply(&progress(3)).is_empty(), "progress moves the frame only");
        let frame = v.frame();
        assert_eq!(
            frame,
            [
                format!("job-7 RUNNING   step 3/10 [{}>{}]  30%", "=".repeat(9), " ".repeat(20)),
                "  loss 2.2000  lr 1.00e-3  812 tok/s  eta 11s".to_owned(),
                format!("  rank 0   {:<20} JOINED", "w-a"),
                format!("  rank 1   {:<20} JOINED", "w-b"),
            ]
        );

        let eval = Event::Eval(v1::EvalMetrics { step: 3, loss: 2.0, bleu: Some(3.4), ..Default::default() });
        assert_eq!(v.apply(&eval), ["eval step 3 loss 2.0000 bleu 3.40"]);
        assert_eq!(v.frame()[2], "  eval step 3 loss 2.0000 bleu 3.40");
        assert_eq!(
            v.apply(&worker(1, "w-b", v1::WorkerEventKind::Checkpoint, "step 3")),
            ["worker w-b rank 1 CHECKPOINT: step 3"]
        );
        assert_eq!(v.frame()[4], format!("  rank 1   {:<20} CHECKPOINT  step 3", "w-b"));

        v.apply(&progress(10));
        let done = v.apply(&job(v1::JobState::Succeeded, 10, 0));
        assert_eq!(done, ["job-7 SUCCEEDED step 10/10"]);
        assert_eq!(v.frame()[0], format!("job-7 SUCCEEDED step 10/10 [{}] 100%", "=".repeat(30)));
    }

    #[test]
    fn a_restart_is_a_line_and_rewinds_the_frame() {
        let mut v = View::default();
        v.apply(&job(v1::JobState::Running, 0, 0));
        v.apply(&worker(0, "w-a", v1::WorkerEventKind::Joined, ""));
        v.apply(&progress(6));
        let lost = v.apply(&worker(0, "w-a", v1::WorkerEventKind::Lost, "no heartbeat for 10s"));
        assert_eq!(lost, ["worker w-a rank 0 LOST: no heartbeat for 10s"]);
        let Event::Job(mut j) = job(v1::JobState::Running, 4, 1) else { unreachable!() };
        j.checkpoint_step = 4;
        j.reason = "worker w-a lost".into();
        let lines = v.apply(&Event::Job(j));
        assert_eq!(lines, ["job-7 restarted (restart 1, was at step 6; newest checkpoint step 4): worker w-a lost"]);
        let frame = v.frame();
        assert!(frame[0].starts_with("job-7 RUNNING   step 4/10 "), "{frame:?}");
        assert_eq!(frame.len(), 2, "the old gang's ranks are gone: {frame:?}");

        let Event::Job(mut failed) = job(v1::JobState::Failed, 4, 1) else { unreachable!() };
        failed.reason = "out of restarts".into();
        assert_eq!(v.apply(&Event::Job(failed)), ["job-7 FAILED step 4/10: out of restarts"]);
    }

    #[test]
    fn bars_fill_in_proportion_for_random_steps() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..200 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let total = seed % 5000 + 1;
            let step = (seed >> 20) % (total + 1);
            let b = bar(step, total);
            assert_eq!(b.chars().count(), BAR_WIDTH, "{step}/{total}");
            let filled = b.chars().filter(|&c| c == '=').count();
            let exact = step as f64 * BAR_WIDTH as f64 / total as f64;
            assert!(filled as f64 <= exact && exact < filled as f64 + 1.0, "{step}/{total}: {b:?}");
            assert_eq!(percent(step, total), step * 100 / total);
        }
        assert_eq!(bar(5, 0), " ".repeat(BAR_WIDTH));
        // Any total a coordinator may report: no overflow, no division by zero.
        assert_eq!((percent(5, 0), percent(u64::MAX, u64::MAX), percent(u64::MAX / 2, u64::MAX)), (0, 100, 49));
        assert_eq!(bar(u64::MAX, u64::MAX), "=".repeat(BAR_WIDTH));
    }

    #[test]
    fn plain_lines_keep_their_format() {
        assert_eq!(plain_line(&progress(3)), "step 3/10 loss 2.2000 lr 1.000e-3 812 tok/s eta 11s");
        assert_eq!(plain_line(&job(v1::JobState::Running, 3, 0)), "job-7 RUNNING step 3/10");
    }

    #[test]
    fn durations_and_ages_read_plainly() {
        assert_eq!(duration(42.4), "42s");
        assert_eq!(duration(185.0), "3m05s");
        assert_eq!(duration(7620.0), "2h07m");
        assert_eq!(duration(f64::NAN), "?");
        let now = 1_700_000_000_000;
        assert_eq!(age(now - 12_300, now), "12s ago");
        assert_eq!(age(now - 5 * 60_000, now), "5m ago");
        assert_eq!(age(now - 3 * 3_600_000, now), "3h ago");
        assert_eq!(age(now - 2 * 86_400_000, now), "2d ago");
        assert_eq!(age(0, now), "-");
    }
}
