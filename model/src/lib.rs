//! BERT2BERT on any `kernels::Backend`: HF-named parameters in one flat buffer, the encoder,
//! the decoder with cross-attention, the LM head and loss, with hand-written backward.

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod error;
pub mod guards;
pub mod init;
pub mod job;
pub mod metrics;
pub mod net;
pub mod optim;
pub mod params;
pub mod pipeline;
/// Where a job may read and write (`jobspec::policy`, re-exported for the ML side's paths).
pub use jobspec::policy;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod tokenizer;

pub use config::{BertConfig, ModelConfig, Variant};
pub use error::{Error, Result};
pub use params::ParamTable;
