//! Training: the loop over data-parallel micro-batches, evaluation, and checkpoints with exact
//! resume. Generic over the backend and the collective, so the same code trains on the CPU, on
//! one GPU, and (with a ring or NCCL collective) across workers.

pub mod evaluate;
pub mod peer;
pub mod ring;
pub mod state;
pub mod tensorboard;
pub mod trainer;

pub use trainer::{Event, StepStats, Trainer};
