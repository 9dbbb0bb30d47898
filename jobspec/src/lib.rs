//! The job file of bert2bert: what to train, on what data, how, and where. One YAML document,
//! parsed into a checked [`JobSpec`], with the limits an untrusted file must keep and the path
//! policy that confines its paths.
//!
//! This crate has no ML dependency on purpose: the coordinator and deploy-check parse and
//! check job files with it alone. What needs the model (its config files, the optimiser) stays
//! in the `model` crate, which re-exports everything here as `model::job`.

pub mod error;
pub mod job;
pub mod limits;
pub mod names;
pub mod policy;
pub mod schedule;

pub use error::{Error, Result, chain, redact_quoted};
pub use job::*;
pub use names::{Device, Metric, Precision, ROBERTA_VARIANTS, ScheduleKind, Variant};
pub use schedule::{AdamWConfig, Schedule};
