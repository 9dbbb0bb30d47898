//! The gRPC handlers: each turns its request into a domain value (`convert`), calls the
//! domain, and turns the answer back. Nothing else lives here.

use std::sync::Arc;

use proto::v1;
use proto::v1::job_service_server::JobService;
use proto::v1::worker_service_server::WorkerService;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::convert::{self, Cancel, Heartbeat, JobId, Submit};
use crate::domain::{Clock, JobEvent, JobFilter};
use crate::jobs::Jobs;
use crate::workers::{Registration, Workers};

/// JobService over the job manager.
pub struct JobApi {
    pub jobs: Arc<Jobs>,
    pub clock: Arc<dyn Clock>,
    /// Becomes true when the server shuts down; open Watch streams then end.
    pub shutdown: watch::Receiver<bool>,
}

type WatchStream = ReceiverStream<Result<v1::WatchJobResponse, Status>>;

#[tonic::async_trait]
impl JobService for JobApi {
    async fn submit(&self, req: Request<v1::SubmitJobRequest>) -> Result<Response<v1::SubmitJobResponse>, Status> {
        let Submit(spec) = req.into_inner().try_into()?;
        let job = self.jobs.submit(&spec)?;
        Ok(Response::new(v1::SubmitJobResponse { job: Some(job.into()) }))
    }

    async fn get(&self, req: Request<v1::GetJobRequest>) -> Result<Response<v1::GetJobResponse>, Status> {
        let JobId(id) = req.into_inner().try_into()?;
        Ok(Response::new(v1::GetJobResponse { job: Some(self.jobs.get(&id)?.into()) }))
    }

    async fn list(&self, req: Request<v1::ListJobsRequest>) -> Result<Response<v1::ListJobsResponse>, Status> {
        let filter: JobFilter = req.into_inner().try_into()?;
        let jobs = self.jobs.list(&filter)?.into_iter().map(Into::into).collect();
        Ok(Response::new(v1::ListJobsResponse { jobs }))
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

/// WorkerService over the worker registry. Rendezvous, progress, checkpoints and outcomes come
/// with the scheduler; until then those RPCs answer UNIMPLEMENTED.
pub struct WorkerApi {
    pub workers: Arc<Workers>,
}

/// Resolves once the shutdown flag is set (or its sender is gone).
pub async fn stopped(flag: &mut watch::Receiver<bool>) {
    let _ = flag.wait_for(|&stop| stop).await;
}

fn not_yet(rpc: &str) -> Status {
    Status::unimplemented(format!("WorkerService.{rpc} is not implemented by this coordinator yet"))
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
            worker_id: w.id,
            heartbeat_interval_ms: self.workers.heartbeat_interval.as_millis() as u64,
            heartbeat_timeout_ms: self.workers.heartbeat_timeout.as_millis() as u64,
        }))
    }

    async fn heartbeat(&self, req: Request<v1::HeartbeatRequest>) -> Result<Response<v1::HeartbeatResponse>, Status> {
        let hb: Heartbeat = req.into_inner().try_into()?;
        let command = self.workers.heartbeat(&hb.worker_id)?;
        Ok(Response::new(v1::HeartbeatResponse { command: v1::WorkerCommand::from(command) as i32 }))
    }

    async fn get_assignment(
        &self,
        _req: Request<v1::GetAssignmentRequest>,
    ) -> Result<Response<v1::GetAssignmentResponse>, Status> {
        Err(not_yet("GetAssignment"))
    }

    async fn report_progress(
        &self,
        _req: Request<v1::ReportProgressRequest>,
    ) -> Result<Response<v1::ReportProgressResponse>, Status> {
        Err(not_yet("ReportProgress"))
    }

    async fn commit_checkpoint(
        &self,
        _req: Request<v1::CommitCheckpointRequest>,
    ) -> Result<Response<v1::CommitCheckpointResponse>, Status> {
        Err(not_yet("CommitCheckpoint"))
    }

    async fn report_done(
        &self,
        _req: Request<v1::ReportDoneRequest>,
    ) -> Result<Response<v1::ReportDoneResponse>, Status> {
        Err(not_yet("ReportDone"))
    }

    async fn report_failed(
        &self,
        _req: Request<v1::ReportFailedRequest>,
    ) -> Result<Response<v1::ReportFailedResponse>, Status> {
        Err(not_yet("ReportFailed"))
    }
}
