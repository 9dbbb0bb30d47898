//! Progress reports off the training thread.
//!
//! The trainer hands each step's progress to [`Reporter::publish`], which only replaces a value
//! in a `watch` channel: the training thread never waits on the coordinator. A task on the
//! agent's runtime sends the newest value, then rests for the reporting interval, so a worker
//! sends a few reports a second at most, whatever its step rate (the latest value wins; steps in
//! between are not needed: the coordinator keeps only the latest step). A STOP in a response is
//! kept for the training thread to act on at its next step.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use proto::v1;
use tokio::sync::watch;

use crate::Client;

/// Rank 0's reports drive the job's step and ETA; at most this often.
pub(crate) const RANK0_INTERVAL: Duration = Duration::from_millis(250);
/// Other ranks' reports only renew their membership and fetch STOP; at most this often.
pub(crate) const OTHER_INTERVAL: Duration = Duration::from_secs(1);
/// How long `finish` waits to deliver the last progress.
const FLUSH_LIMIT: Duration = Duration::from_secs(5);

pub(crate) struct Reporter {
    tx: watch::Sender<Option<v1::Progress>>,
    stop_seen: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Reporter {
    /// Starts the sending task on `rt`; `base` carries the worker's identity and attempt.
    pub(crate) fn start(
        rt: &tokio::runtime::Runtime,
        client: Client,
        base: v1::ReportProgressRequest,
        interval: Duration,
    ) -> Reporter {
        let (tx, rx) = watch::channel(None);
        let stop_seen = Arc::new(AtomicBool::new(false));
        let task = rt.spawn(send_latest(rx, client, base, interval, stop_seen.clone()));
        Reporter { tx, stop_seen, task }
    }

    /// Hands over this step's progress; never blocks.
    pub(crate) fn publish(&self, p: v1::Progress) {
        self.tx.send_replace(Some(p));
    }

    /// True once a response said STOP (the attempt is no longer current).
    pub(crate) fn stop_requested(&self) -> bool {
        self.stop_seen.load(Ordering::SeqCst)
    }

    /// Delivers the last progress not yet sent (bounded wait), then ends the task.
    pub(crate) fn finish(self, rt: &tokio::runtime::Runtime) {
        let Reporter { tx, task, .. } = self;
        drop(tx);
        let _ = rt.block_on(async { tokio::time::timeout(FLUSH_LIMIT, task).await });
    }
}

async fn send_latest(
    mut rx: watch::Receiver<Option<v1::Progress>>,
    client: Client,
    base: v1::ReportProgressRequest,
    interval: Duration,
    stop_seen: Arc<AtomicBool>,
) {
    // `changed` still yields a value published just before the sender was dropped, so the
    // final step is sent before the task ends.
    while rx.changed().await.is_ok() {
        let Some(progress) = *rx.borrow_and_update() else { continue };
        let req = v1::ReportProgressRequest { progress: Some(progress), ..base.clone() };
        match client.clone().report_progress(req).await {
            Ok(r) if r.get_ref().command() == v1::WorkerCommand::Stop => stop_seen.store(true, Ordering::SeqCst),
            Ok(_) => {}
            Err(s) => tracing::warn!("ReportProgress: {}", s.message()),
        }
        tokio::time::sleep(interval).await;
    }
}
