//! One assignment, from joining the gang to reporting how it ended: the CPU ring (or NCCL, in
//! [`crate::nccl`]), the trainer, progress and evaluation reports, checkpoint commits.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use model::job::{JobModelExt, JobSpec};
use proto::v1;
use worker::ring::RingCollective;
use worker::tensorboard::{TrainLog, recording};
use worker::{Event, Trainer};

use crate::error::{Error, Result};
use crate::session::SHUTDOWN_REASON;
use crate::{Client, Current, Me, nccl, report, take};

fn shutdown_error() -> Error {
    Error::failure(SHUTDOWN_REASON)
}

fn stopped_error() -> Error {
    Error::failure("stopped by the coordinator")
}

/// Runs one assignment to its end and reports the outcome; never fails (a failure is reported).
pub(crate) fn attempt(
    rt: &tokio::runtime::Runtime,
    client: &Client,
    listener: &TcpListener,
    current: &Arc<Mutex<Current>>,
    asg: v1::Assignment,
    timeout: Duration,
) {
    let me = take(current, |c| {
        c.job = Some((asg.job_id.clone(), asg.attempt));
        c.step = asg.resume_step;
        c.stop = false;
        c.me.clone()
    });
    tracing::info!(job = %asg.job_id, attempt = asg.attempt, rank = asg.rank, world = asg.world_size, "assigned");
    let result = train(rt, client, listener, current, &asg, &me, timeout);
    let (stopped, step, shutdown, held_state) = take(current, |c| {
        c.job = None;
        c.ring = None;
        (std::mem::take(&mut c.stop), c.step, c.shutdown.load(Ordering::SeqCst), c.held_state())
    });
    // Leaving: say so whatever else failed, so that the coordinator drops this worker.
    let result = if shutdown && result.is_err() { Err(shutdown_error()) } else { result };
    let (job_id, attempt) = (asg.job_id.clone(), asg.attempt);
    let (worker_id, worker_secret) = (me.id, me.secret);
    let report = match result {
        Ok(()) => {
            tracing::info!(job = %job_id, step, "attempt done");
            let req = v1::ReportDoneRequest { worker_id, job_id, attempt, step, worker_secret, ..Default::default() };
            rt.block_on(client.clone().report_done(req)).map(|_| ())
        }
        Err(e) => {
            let reason = e.to_string();
            // Usage errors are the job's fault (a bad key, path or data file, a path outside the
            // allowed roots): another attempt would fail alike.
            let kind = if shutdown {
                v1::FailureKind::WorkerShutdown
            } else if e.is_usage() && !stopped {
                v1::FailureKind::InputError
            } else {
                v1::FailureKind::Error
            };
            if stopped || shutdown {
                tracing::info!(job = %job_id, step, "attempt stopped: {reason}");
            } else {
                tracing::error!(job = %job_id, "attempt failed: {reason}");
            }
            let input_error = kind == v1::FailureKind::InputError;
            let req = v1::ReportFailedRequest {
                worker_id,
                job_id,
                attempt,
                step,
                reason,
                worker_secret,
                input_error,
                kind: kind as i32,
                held_state,
            };
            rt.block_on(client.clone().report_failed(req)).map(|_| ())
        }
    };
    if let Err(s) = report {
        tracing::warn!("reporting the outcome: {}", s.message());
    }
}

fn commit_checkpoint(
    rt: &tokio::runtime::Runtime,
    client: &Client,
    asg: &v1::Assignment,
    me: &Me,
    step: u64,
    dir: &Path,
) {
    let req = v1::CommitCheckpointRequest {
        worker_id: me.id.clone(),
        worker_secret: me.secret.clone(),
        job_id: asg.job_id.clone(),
        attempt: asg.attempt,
        step,
        path: dir.display().to_string(),
        manifest_sha256: String::new(),
    };
    if let Err(s) = rt.block_on(client.clone().commit_checkpoint(req)) {
        tracing::warn!("CommitCheckpoint: {}", s.message());
    }
}

fn train(
    rt: &tokio::runtime::Runtime,
    client: &Client,
    listener: &TcpListener,
    current: &Arc<Mutex<Current>>,
    asg: &v1::Assignment,
    me: &Me,
    timeout: Duration,
) -> Result {
    let shutdown = take(current, |c| c.shutdown.clone());
    if shutdown.load(Ordering::SeqCst) {
        return Err(shutdown_error());
    }
    let spec = JobSpec::from_str(&asg.job_yaml, Path::new("assignment.job_yaml"))?;
    check_paths(&take(current, |c| c.policy.clone()), &spec, asg)?;
    // Submit checks lengths against the model only when the coordinator can read it; without
    // this, a length past the model's positions dies at the first long example, every attempt.
    spec.check_against_model()?;
    if spec.resources.device == jobspec::Device::Cuda {
        return nccl::train(rt, client, current, asg, me, spec, timeout);
    }
    let peers = asg
        .ring_peers
        .iter()
        .map(|p| p.parse::<SocketAddr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::failure(format!("assignment.ring_peers: {e}")))?;
    let ring = RingCollective::connect(
        asg.rank as usize,
        asg.world_size as usize,
        asg.ring_token,
        listener.try_clone()?,
        &peers,
        timeout,
    )?;
    let ring = Arc::new(ring);
    take(current, |c| c.ring = Some(ring.clone()));
    run_trainer(rt, client, current, asg, me, (&kernels::Cpu, &*ring, spec, timeout), (&shutdown, &|| ring.abort()))
}

/// The worker's own check of where the job points (`--allow-*`), with symlinks resolved,
/// before anything is opened: a coordinator's lexical check cannot see this filesystem. The
/// error (usage: the job fails without retries) names the key, never a file's contents.
fn check_paths(policy: &model::policy::PathPolicy, spec: &JobSpec, asg: &v1::Assignment) -> Result {
    use model::policy::{PathKind, resolve};
    policy.check_resolved(spec)?;
    if !asg.resume_checkpoint.is_empty() {
        let (origin, key) = (Path::new("assignment"), "resume_checkpoint");
        policy.check_path(origin, key, PathKind::Checkpoints, Path::new(&asg.resume_checkpoint), resolve)?;
    }
    Ok(())
}

/// Trains the rank on `backend` with `collective` until the job ends or is stopped; `timeout`
/// (--collective-timeout) bounds each step's wait for its collectives. `halt` is the trainer's
/// stop flag (checked between steps; the shutdown flag sets it too); `abort` makes a STOP from
/// the coordinator take effect.
pub(crate) fn run_trainer<B: kernels::Backend + Sync, C: kernels::collective::Collective<B> + Sync>(
    rt: &tokio::runtime::Runtime,
    client: &Client,
    current: &Arc<Mutex<Current>>,
    asg: &v1::Assignment,
    me: &Me,
    (backend, collective, spec, timeout): (&B, &C, JobSpec, Duration),
    (halt, abort): (&Arc<AtomicBool>, &dyn Fn()),
) -> Result {
    let (shutdown, health) = take(current, |c| (c.shutdown.clone(), c.health.clone()));
    // Checkpoints name the coordinator's job id: another job sharing checkpoint.dir is refused.
    let owner = worker::state::JobOwner { name: spec.name.clone(), id: Some(asg.job_id.clone()) };
    // A state kept from another attempt is used (by the rank named to hand it on) or dropped.
    // It stays held when the trainer cannot be made (the next attempt may still use it).
    let held = take(current, |c| c.held.take()).filter(|h| h.job_id == asg.job_id);
    let made = match asg.resume_peer_rank {
        Some(root) => {
            let mine = held.as_ref().filter(|_| root == asg.rank).map(|h| &h.snapshot);
            Trainer::new_from_peer(backend, collective, spec, owner, (root as usize, mine)).map(|t| (t, None))
        }
        None => Trainer::new_owned(backend, collective, spec, owner),
    };
    let (mut trainer, resumed) = match made {
        Ok(made) => made,
        Err(e) => {
            take(current, |c| c.held = held);
            return Err(e.into());
        }
    };
    drop(held);
    trainer.stop = Some(halt.clone());
    // A step fails (and the attempt with it) instead of hanging when a peer dies mid-collective.
    trainer.collective_timeout = timeout;
    // The trainer resumes from the newest valid checkpoint on disk, which may be past the
    // coordinator's last committed one (a commit lost with a crash): report from there, or a
    // finished job would be reported done at the older step.
    take(current, |c| c.step = trainer.step);
    // A checkpoint newer than the coordinator knows (its commit was lost in a crash of rank 0 or
    // of the coordinator): commit it, so that the job's committed step is the one resumed from.
    // (Not a `checkpoint.resume_from` outside checkpoint.dir: that one is another job's.)
    if let Some(Event::Resumed { step, from }) = &resumed
        && asg.rank == 0
        && *step > asg.resume_step
        && from.starts_with(&trainer.job.checkpoint.dir)
    {
        commit_checkpoint(rt, client, asg, me, *step, from);
    }
    if take(current, |c| c.stop) {
        return Err(stopped_error());
    }
    let t0 = Instant::now();
    let mut tokens = 0usize;
    let base = v1::ReportProgressRequest {
        worker_id: me.id.clone(),
        worker_secret: me.secret.clone(),
        job_id: asg.job_id.clone(),
        attempt: asg.attempt,
        ..Default::default()
    };
    let stop_flag = AtomicBool::new(false);
    // Per-step progress goes through a background sender: the step never waits on the RPC.
    let interval = if asg.rank == 0 { report::RANK0_INTERVAL } else { report::OTHER_INTERVAL };
    let reporter = report::Reporter::start(rt, client.clone(), base.clone(), interval);
    // An evaluation is reported with the progress of the step that ran it.
    let mut last_progress = v1::Progress::default();
    // Rank 0 alone writes the job's loss curves; a log dir it cannot write costs the curves only.
    let mut curves = (asg.rank == 0)
        .then(|| TrainLog::create(&trainer.job.logging.dir, trainer.step, asg.world_size as usize))
        .and_then(|made| made.map_err(|e| tracing::warn!("logging.dir: no TensorBoard events: {e}")).ok());
    // What failures have cost the job so far, as the coordinator counts it, at the resume step.
    if let (Some(log), Some(g)) = (curves.as_mut(), asg.goodput.as_ref()) {
        let values = [
            ("goodput/ratio", g.ratio),
            ("goodput/failures", f64::from(g.failures)),
            ("goodput/steps_lost", g.steps_lost as f64),
            ("goodput/recovering_s", g.recovering_s),
        ];
        log.scalars(trainer.step, &values);
    }
    let mut on_event = recording(curves.as_mut(), |e| match e {
        Event::Step(s) => {
            health.beat();
            if shutdown.load(Ordering::SeqCst) {
                halt.store(true, Ordering::SeqCst);
            }
            take(current, |c| c.step = s.step);
            tokens += s.tokens * asg.world_size as usize;
            let secs = t0.elapsed().as_secs_f64().max(1e-9);
            let done = s.step.saturating_sub(asg.resume_step).max(1) as f64;
            let progress = v1::Progress {
                step: s.step,
                total_steps: s.total_steps,
                loss: s.loss as f32,
                lr: s.lr,
                tokens_per_s: tokens as f64 / secs,
                eta_s: secs / done * s.total_steps.saturating_sub(s.step) as f64,
            };
            last_progress = progress;
            reporter.publish(progress);
            // A STOP that came back with an earlier report takes effect here, between steps.
            if reporter.stop_requested() && !stop_flag.swap(true, Ordering::SeqCst) {
                take(current, |c| c.stop = true);
                abort();
            }
        }
        Event::Checkpoint { step, dir } => {
            health.beat();
            commit_checkpoint(rt, client, asg, me, *step, dir)
        }
        Event::Eval { step, result } => {
            health.beat();
            report_eval(rt, client, asg, &base, last_progress, *step, result)
        }
        Event::Resumed { .. } => {}
    });
    let ran = trainer.run(None, 0, &mut on_event);
    drop(on_event);
    keep_state(current, &asg.job_id, &trainer, &shutdown);
    // The last progress is delivered; a STOP that comes back now changes nothing: training
    // has already ended, and how it ended is reported next.
    reporter.finish(rt);
    ran?;
    if stop_flag.load(Ordering::SeqCst) {
        return Err(stopped_error());
    }
    if shutdown.load(Ordering::SeqCst) && trainer.step < trainer.job.training.steps {
        return Err(shutdown_error());
    }
    Ok(())
}

/// Keeps the trainer's state in memory when its job is not finished, so that the next attempt
/// can resume from it instead of from the last checkpoint. Whatever ended `run` (a dead peer
/// mid-step, a STOP), the state is that of the last completed step: a step changes it only
/// after all of its collectives are done (see [`worker::peer`]). A worker that is leaving keeps
/// nothing.
fn keep_state<B: kernels::Backend + Sync, C: kernels::collective::Collective<B> + Sync>(
    current: &Mutex<Current>,
    job_id: &str,
    trainer: &Trainer<'_, B, C>,
    shutdown: &AtomicBool,
) {
    let wanted = take(current, |c| c.keep_state);
    if !wanted || trainer.step >= trainer.job.training.steps || shutdown.load(Ordering::SeqCst) {
        return;
    }
    match trainer.snapshot() {
        Ok(snapshot) => {
            tracing::info!(job = %job_id, step = snapshot.step, "keeping the training state in memory for the next attempt");
            take(current, |c| c.held = Some(crate::Held { job_id: job_id.to_owned(), snapshot }));
        }
        Err(e) => tracing::warn!("could not keep the training state: {e}"),
    }
}

/// Rank 0 reports an evaluation with the progress of the step that ran it.
fn report_eval(
    rt: &tokio::runtime::Runtime,
    client: &Client,
    asg: &v1::Assignment,
    base: &v1::ReportProgressRequest,
    progress: v1::Progress,
    step: u64,
    result: &worker::evaluate::EvalResult,
) {
    tracing::info!(step, loss = result.loss, "evaluation");
    if asg.rank != 0 {
        return;
    }
    let eval = v1::EvalMetrics {
        step,
        loss: result.loss as f32,
        bleu: result.bleu.map(|b| b as f32),
        rouge1: result.rouge.as_ref().map(|r| r.rouge1 as f32),
        rouge2: result.rouge.as_ref().map(|r| r.rouge2 as f32),
        rouge_l: result.rouge.as_ref().map(|r| r.rouge_l as f32),
        identical_share: result.diversity.map(|d| d.identical as f32),
        distinct1: result.diversity.map(|d| d.distinct1 as f32),
        distinct2: result.diversity.map(|d| d.distinct2 as f32),
    };
    let req = v1::ReportProgressRequest { progress: Some(progress), eval: Some(eval), ..base.clone() };
    if let Err(s) = rt.block_on(client.clone().report_progress(req)) {
        tracing::warn!("ReportProgress (evaluation): {}", s.message());
    }
}
