//! The gRPC handlers: each turns its request into a domain value (`convert`), calls the
//! domain, and turns the answer back. Nothing else lives here.

use std::sync::Arc;
use std::time::Duration;

use proto::v1;
use proto::v1::job_service_server::JobService;
use proto::v1::worker_service_server::WorkerService;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::admission::SpecGate;
use crate::convert::{
    self, AssignmentPoll, Cancel, Commit, Deregister, Done, Failed, Heartbeat, JobId, ListPage, ReportProgress, Submit,
};
use crate::domain::{Clock, JobEvent};
use crate::jobs::Jobs;
use crate::scheduler::{AttemptRef, Scheduler};
use crate::workers::{Command, Registration, Workers};

/// JobService over the job manager.
pub struct JobApi {
    pub jobs: Arc<Jobs>,
    pub clock: Arc<dyn Clock>,
    /// Becomes true when the server shuts down; open Watch streams then end.
    pub shutdown: watch::Receiver<bool>,
    /// Where a submitted job may point.
    pub policy: Arc<jobspec::policy::PathPolicy>,
    /// Runs job file checks on blocking threads, a few at a time, within a time budget.
    pub gate: Arc<SpecGate>,
}

type WatchStream = ReceiverStream<Result<v1::WatchJobResponse, Status>>;

#[tonic::async_trait]
impl JobService for JobApi {
    async fn submit(&self, req: Request<v1::SubmitJobRequest>) -> Result<Response<v1::SubmitJobResponse>, Status> {
        let req = req.into_inner();
        convert::check_job_size(&req)?;
        let policy = self.policy.clone();
        // Off the executor and time-boxed: a hostile file must not stall other calls.
        let Submit(spec) = self.gate.run("job_yaml", move || convert::checked_submit(req, &policy)).await?;
        let job = self.jobs.submit(&spec)?;
        Ok(Response::new(v1::SubmitJobResponse { job: Some(job.into()) }))
    }

    async fn get(&self, req: Request<v1::GetJobRequest>) -> Result<Response<v1::GetJobResponse>, Status> {
        let JobId(id) = req.into_inner().try_into()?;
        Ok(Response::new(v1::GetJobResponse { job: Some(self.jobs.get(&id)?.into()) }))
    }

    async fn list(&self, req: Request<v1::ListJobsRequest>) -> Result<Response<v1::ListJobsResponse>, Status> {
        let ListPage { filter, before } = req.into_inner().try_into()?;
        let (jobs, more) = self.jobs.page(&filter, before)?;
        Ok(Response::new(convert::list_response(jobs, more)?))
    }

    async fn delete_job(&self, req: Request<v1::DeleteJobRequest>) -> Result<Response<v1::DeleteJobResponse>, Status> {
        let JobId(id) = req.into_inner().try_into()?;
        self.jobs.delete(&id)?;
        Ok(Response::new(v1::DeleteJobResponse {}))
    }

    async fn cancel(&self, req: Request<v1::CancelJobRequest>) -> Result<Response<v1::CancelJobResponse>, Status> {
        let Cancel { job_id, reason } = req.into_inner().try_into()?;
        let job = self.jobs.cancel(&job_id, &reason)?;
        Ok(Response::new(v1::CancelJobResponse { job: Some(job.into()) }))
    }

    type WatchStream = WatchStream;

    async fn watch(&self, req: Request<v1::WatchJobRequest>) -> Result<Response<WatchStream>, Status> {
        let JobId(id) = req.into_inner().try_into()?;
        let sub = self.jobs.watch(&id)?;
        let (tx, rx) = mpsc::channel(64);
        let (jobs, clock, mut shutdown) = (self.jobs.clone(), self.clock.clone(), self.shutdown.clone());
        tokio::spawn(async move {
            let send = |ev: JobEvent| {
                let tx = tx.clone();
                let msg = convert::watch_response(ev, clock.now_ms());
                async move { tx.send(Ok(msg)).await.is_ok() }
            };
            if !send(JobEvent::Job(sub.job)).await {
                return;
            }
            for member in sub.members {
                if !send(JobEvent::Worker(member)).await {
                    return;
                }
            }
            let Some(mut events) = sub.events else { return };
            loop {
                let event = tokio::select! {
                    _ = tx.closed() => return,
                    _ = stopped(&mut shutdown) => {
                        let _ = tx.send(Err(Status::unavailable("the coordinator is shutting down"))).await;
                        return;
                    }
                    ev = events.recv() => ev,
                };
                let event = match event {
                    Ok(ev) => ev,
                    // Fell behind: skip ahead to the job as it is now.
                    Err(broadcast::error::RecvError::Lagged(_)) => match jobs.get(&id) {
                        Ok(job) => JobEvent::Job(job),
                        Err(e) => {
                            let _ = tx.send(Err(e.into())).await;
                            return;
                        }
                    },
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                let last = matches!(&event, JobEvent::Job(j) if j.state.is_terminal());
                if !send(event).await || last {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// WorkerService over the worker registry and the scheduler.
pub struct WorkerApi {
    pub workers: Arc<Workers>,
    pub scheduler: Arc<Scheduler>,
}

/// Resolves once the shutdown flag is set (or its sender is gone).
pub async fn stopped(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|&stop| stop).await;
}

fn command(c: Command) -> i32 {
    v1::WorkerCommand::from(c) as i32
}

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    async fn register(
        &self,
        req: Request<v1::RegisterWorkerRequest>,
    ) -> Result<Response<v1::RegisterWorkerResponse>, Status> {
        let reg: Registration = req.into_inner().try_into()?;
        let w = self.workers.register(reg)?;
        Ok(Response::new(v1::RegisterWorkerResponse {
            worker_secret: self.workers.secret(&w.id),
            worker_id: w.id,
            heartbeat_interval_ms: self.workers.heartbeat_interval.as_millis() as u64,
            heartbeat_timeout_ms: self.workers.heartbeat_timeout.as_millis() as u64,
        }))
    }

    async fn heartbeat(&self, req: Request<v1::HeartbeatRequest>) -> Result<Response<v1::HeartbeatResponse>, Status> {
        let hb: Heartbeat = req.into_inner().try_into()?;
        self.workers.authenticate(&hb.worker_id, &hb.secret)?;
        let mut c = self.workers.heartbeat(&hb.worker_id)?;
        if let (Command::Continue, Some((job_id, attempt))) = (c, hb.job) {
            c = self.scheduler.command(&AttemptRef { worker_id: hb.worker_id, job_id, attempt })?;
        }
        Ok(Response::new(v1::HeartbeatResponse { command: command(c) }))
    }

    async fn get_assignment(
        &self,
        req: Request<v1::GetAssignmentRequest>,
    ) -> Result<Response<v1::GetAssignmentResponse>, Status> {
        let poll: AssignmentPoll = req.into_inner().try_into()?;
        self.workers.authenticate(&poll.worker_id, &poll.secret)?;
        if let Some(id) = &poll.nccl_unique_id {
            self.scheduler.post_nccl_id(&poll.worker_id, id)?;
        }
        let kept = self.scheduler.note_held(&poll.worker_id, poll.held)?;
        // Woken by the scheduler (see Scheduler::wait_for_assignment), not a polling loop.
        let wait = Duration::from_millis(u64::from(poll.wait_ms));
        let a = self.scheduler.wait_for_assignment(&poll.worker_id, wait).await?;
        Ok(Response::new(v1::GetAssignmentResponse { assignment: a.map(Into::into), release_held_state: !kept }))
    }

    async fn report_progress(
        &self,
        req: Request<v1::ReportProgressRequest>,
    ) -> Result<Response<v1::ReportProgressResponse>, Status> {
        let ReportProgress { at, progress, eval, secret } = req.into_inner().try_into()?;
        self.workers.authenticate(&at.worker_id, &secret)?;
        let c = self.scheduler.progress(&at, progress)?;
        if let Some(e) = eval {
            self.scheduler.eval(&at, e)?;
        }
        Ok(Response::new(v1::ReportProgressResponse { command: command(c) }))
    }

    async fn commit_checkpoint(
        &self,
        req: Request<v1::CommitCheckpointRequest>,
    ) -> Result<Response<v1::CommitCheckpointResponse>, Status> {
        let Commit { at, step, path, manifest_sha256, secret } = req.into_inner().try_into()?;
        self.workers.authenticate(&at.worker_id, &secret)?;
        let c = self.scheduler.commit_checkpoint(&at, step, path, manifest_sha256)?;
        Ok(Response::new(v1::CommitCheckpointResponse { command: command(c) }))
    }

    async fn report_done(
        &self,
        req: Request<v1::ReportDoneRequest>,
    ) -> Result<Response<v1::ReportDoneResponse>, Status> {
        let Done { at, step, secret } = req.into_inner().try_into()?;
        self.workers.authenticate(&at.worker_id, &secret)?;
        self.scheduler.done(&at, step)?;
        Ok(Response::new(v1::ReportDoneResponse {}))
    }

    async fn report_failed(
        &self,
        req: Request<v1::ReportFailedRequest>,
    ) -> Result<Response<v1::ReportFailedResponse>, Status> {
        let Failed { at, reason, kind, secret, held, step } = req.into_inner().try_into()?;
        self.workers.authenticate(&at.worker_id, &secret)?;
        // Before the attempt ends: the gang that re-forms at once must know what this worker holds.
        self.scheduler.note_held(&at.worker_id, held)?;
        self.scheduler.failed_at(&at, &reason, kind, step)?;
        Ok(Response::new(v1::ReportFailedResponse {}))
    }

    async fn deregister(
        &self,
        req: Request<v1::DeregisterRequest>,
    ) -> Result<Response<v1::DeregisterResponse>, Status> {
        let Deregister { worker_id, reason, secret } = req.into_inner().try_into()?;
        self.workers.authenticate(&worker_id, &secret)?;
        if let Some(w) = self.workers.deregister(&worker_id)? {
            self.scheduler.left(&w, &reason)?;
        }
        Ok(Response::new(v1::DeregisterResponse {}))
    }
}
