//! TensorBoard event files: the writer rank 0 uses for its loss curves, and the reader
//! `bert2bert plot` uses.
//!
//! An event file is a TFRecord stream: each record is `u64 length`, `u32 masked CRC32C of the
//! length bytes`, the data, `u32 masked CRC32C of the data` (all little-endian). Each record holds
//! one serialised `tensorflow.Event`; the first says `file_version: "brain.Event:2"`. Only the
//! messages and fields we write are declared here, with the field numbers of tensorflow's
//! event.proto and summary.proto; prost skips the others when reading.
//!
//! Every record goes to the file in a single unbuffered write, so a crash of the process loses
//! at most the record being written, which the reader then reports as torn and skips.
//!
//! A resumed run writes a new file whose first event after the version is a `SessionLog START`
//! at the first step it will train: TensorBoard then drops the older files' points from that step
//! on (those of the steps the crashed run trained past its last checkpoint), and so does
//! [`read_scalars`].

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use prost::Message;

use crate::trainer::Event as TrainEvent;

/// `tensorflow.Event`; `file_version`, `summary` and `session_log` are members of a oneof there,
/// which encodes as optional fields (at most one set).
#[derive(Clone, PartialEq, Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(string, optional, tag = "3")]
    pub file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    pub summary: Option<Summary>,
    #[prost(message, optional, tag = "7")]
    pub session_log: Option<SessionLog>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<SummaryValue>,
}

/// `tensorflow.Summary.Value`; `simple_value` is a oneof member, so 0.0 is written explicitly.
#[derive(Clone, PartialEq, Message)]
pub struct SummaryValue {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
}

#[derive(Clone, PartialEq, Message)]
pub struct SessionLog {
    /// `SessionLog.SessionStatus`: 1 is START.
    #[prost(int32, tag = "1")]
    pub status: i32,
}

pub const FILE_VERSION: &str = "brain.Event:2";
const SESSION_START: i32 = 1;

fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord: header, data, footer.
pub fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

fn now() -> f64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

fn hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let clean: String = raw.trim().chars().filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_')).collect();
    if clean.is_empty() { "localhost".into() } else { clean }
}

/// Appends events to one new event file.
pub struct EventWriter {
    file: std::fs::File,
    path: PathBuf,
}

impl EventWriter {
    /// A new file `events.out.tfevents.<secs>.<host>.<pid>.<n>` in `dir` (created if missing),
    /// with the file-version record already written.
    pub fn create(dir: &Path) -> std::io::Result<EventWriter> {
        static SERIAL: AtomicU64 = AtomicU64::new(0);
        std::fs::create_dir_all(dir)?;
        let secs = now() as u64;
        let (host, pid) = (hostname(), std::process::id());
        loop {
            let n = SERIAL.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(format!("events.out.tfevents.{secs:010}.{host}.{pid}.{n}"));
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => {
                    let mut w = EventWriter { file, path };
                    w.write(&Event { wall_time: now(), file_version: Some(FILE_VERSION.into()), ..Event::default() })?;
                    return Ok(w);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One record in one write: a live `tensorboard --logdir` sees it at once.
    pub fn write(&mut self, event: &Event) -> std::io::Result<()> {
        self.file.write_all(&frame(&event.encode_to_vec()))?;
        self.file.flush()
    }

    /// Scalars of one step in one event (non-finite values are written as they are).
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) -> std::io::Result<()> {
        let value = values
            .iter()
            .map(|(tag, v)| SummaryValue { tag: (*tag).to_owned(), simple_value: Some(*v as f32) })
            .collect();
        self.write(&Event { wall_time: now(), step: step as i64, summary: Some(Summary { value }), ..Event::default() })
    }

    /// Marks a (re)start at `step`: readers drop older points at `step` and after.
    pub fn session_start(&mut self, step: u64) -> std::io::Result<()> {
        let session_log = Some(SessionLog { status: SESSION_START });
        self.write(&Event { wall_time: now(), step: step as i64, session_log, ..Event::default() })
    }
}

/// Turns training events into scalars: `train/loss`, `train/lr`, `train/grad_norm`,
/// `train/tokens_per_s` every step; `eval/loss`, `eval/bleu`, `eval/rouge1|rouge2|rougeL` at
/// each evaluation. A write failure is logged once and turns the log off: losing the curves must
/// not stop a training run.
pub struct TrainLog {
    writer: Option<EventWriter>,
    world_size: usize,
}

impl TrainLog {
    /// A new event file in `dir`. `resumed_step` is the step a resumed run starts from (0 for a
    /// fresh run); `world_size` scales one rank's token count to the job's throughput.
    pub fn create(dir: &Path, resumed_step: u64, world_size: usize) -> std::io::Result<TrainLog> {
        let mut writer = EventWriter::create(dir)?;
        writer.session_start(resumed_step + 1)?;
        tracing::info!("TensorBoard events: {}", writer.path().display());
        Ok(TrainLog { writer: Some(writer), world_size: world_size.max(1) })
    }

    pub fn path(&self) -> Option<&Path> {
        self.writer.as_ref().map(|w| w.path())
    }

    /// Scalars that come from elsewhere (e.g. the coordinator's goodput) at `step`.
    pub fn scalars(&mut self, step: u64, values: &[(&str, f64)]) {
        let Some(w) = &mut self.writer else { return };
        if let Err(e) = w.scalars(step, values) {
            tracing::warn!("writing {}: {e}; no more TensorBoard events this run", w.path().display());
            self.writer = None;
        }
    }

    pub fn record(&mut self, event: &TrainEvent) {
        let Some(w) = &mut self.writer else { return };
        let written = match event {
            TrainEvent::Step(s) => {
                let secs = (s.step_ms / 1e3).max(1e-9);
                let tokens_per_s = (s.tokens * self.world_size) as f64 / secs;
                w.scalars(
                    s.step,
                    &[
                        ("train/loss", s.loss),
                        ("train/lr", s.lr as f64),
                        ("train/grad_norm", s.grad_norm as f64),
                        ("train/tokens_per_s", tokens_per_s),
                    ],
                )
            }
            TrainEvent::Eval { step, result } => {
                let mut values = vec![("eval/loss", result.loss)];
                if let Some(b) = result.bleu {
                    values.push(("eval/bleu", b));
                }
                if let Some(r) = &result.rouge {
                    values.extend([("eval/rouge1", r.rouge1), ("eval/rouge2", r.rouge2), ("eval/rougeL", r.rouge_l)]);
                }
                if let Some(d) = &result.diversity {
                    values.extend([
                        ("eval/identical_share", d.identical),
                        ("eval/distinct1", d.distinct1),
                        ("eval/distinct2", d.distinct2),
                    ]);
                }
                w.scalars(*step, &values)
            }
            TrainEvent::Checkpoint { .. } | TrainEvent::Resumed { .. } => Ok(()),
        };
        if let Err(e) = written {
            tracing::warn!("writing {}: {e}; no more TensorBoard events this run", w.path().display());
            self.writer = None;
        }
    }
}

/// `on_event` with every event first written to `log` (when there is one), for
/// [`crate::Trainer::run`].
pub fn recording<'a>(
    mut log: Option<&'a mut TrainLog>,
    mut on_event: impl FnMut(&TrainEvent) + 'a,
) -> impl FnMut(&TrainEvent) + 'a {
    move |e| {
        if let Some(log) = log.as_deref_mut() {
            log.record(e);
        }
        on_event(e)
    }
}

/// One point of a curve.
#[derive(Clone, Debug, PartialEq)]
pub struct Scalar {
    pub tag: String,
    pub step: i64,
    pub wall_time: f64,
    pub value: f32,
}

/// The records of one file's bytes, and a warning when the last one is torn (cut short, or its
/// checksums fail where nothing follows it: a crash mid-write). A bad checksum with more
/// records after it is corruption, an error naming the offset.
pub fn records(bytes: &[u8]) -> Result<(Vec<&[u8]>, Option<String>), String> {
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        let rest = &bytes[at..];
        if rest.len() < 12 {
            return Ok((out, Some(format!("torn record at byte {at}: {} bytes of a 12-byte header", rest.len()))));
        }
        let len_bytes = &rest[..8];
        let header_crc = u32::from_le_bytes(rest[8..12].try_into().expect("4 bytes"));
        if masked_crc(len_bytes) != header_crc {
            let msg = format!("bad length checksum of the record at byte {at}");
            return if rest.len() <= 16 { Ok((out, Some(format!("torn record: {msg}")))) } else { Err(msg) };
        }
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes"));
        let need = len.checked_add(16).filter(|&n| n <= rest.len() as u64);
        let Some(need) = need else {
            return Ok((out, Some(format!("torn record at byte {at}: {len} data bytes announced, file ends first"))));
        };
        let data = &rest[12..need as usize - 4];
        let data_crc = u32::from_le_bytes(rest[need as usize - 4..need as usize].try_into().expect("4 bytes"));
        if masked_crc(data) != data_crc {
            let msg = format!("bad data checksum of the record at byte {at}");
            return if need as usize == rest.len() { Ok((out, Some(format!("torn record: {msg}")))) } else { Err(msg) };
        }
        out.push(data);
        at += need as usize;
    }
    Ok((out, None))
}

/// The event files of `dir` in the order TensorBoard reads them (by name: time of creation).
pub fn event_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("tfevents") && e.path().is_file())
        .map(|e| e.path())
        .collect();
    files.sort();
    Ok(files)
}

/// Every scalar of the event files of `dir`, in file then record order, with the points a
/// later `SessionLog START` supersedes dropped (as TensorBoard does). Torn last records become
/// warnings; unreadable files and corrupt records are errors naming the file.
pub fn read_scalars(dir: &Path) -> Result<(Vec<Scalar>, Vec<String>), String> {
    let files = event_files(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let (mut out, mut warnings) = (Vec::<Scalar>::new(), Vec::new());
    for path in files {
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let (recs, torn) = records(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        warnings.extend(torn.map(|w| format!("{}: {w} (skipped)", path.display())));
        for (i, rec) in recs.into_iter().enumerate() {
            let event = Event::decode(rec).map_err(|e| format!("{}: record {i}: not an Event: {e}", path.display()))?;
            if event.session_log.is_some_and(|s| s.status == SESSION_START) {
                out.retain(|s| s.step < event.step);
            }
            for v in event.summary.map(|s| s.value).unwrap_or_default() {
                if let Some(value) = v.simple_value {
                    out.push(Scalar { tag: v.tag, step: event.step, wall_time: event.wall_time, value });
                }
            }
        }
    }
    Ok((out, warnings))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_crc_matches_known_values() {
        // CRC-32C check value (RFC 3720 appendix B.4): 32 zero bytes -> 0x8a9136aa.
        assert_eq!(crc32c::crc32c(&[0u8; 32]), 0x8a91_36aa);
        let crc = 0x8a91_36aau32;
        assert_eq!(masked_crc(&[0u8; 32]), ((crc >> 15) | (crc << 17)).wrapping_add(0xa282_ead8));
    }

    #[test]
    fn records_round_trip_and_torn_tails_are_warnings() {
        let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
        let payloads: Vec<Vec<u8>> =
            (0..7u64).map(|i| (0..(seed.wrapping_mul(i + 1) % 300)).map(|j| (j ^ i ^ seed) as u8).collect()).collect();
        let bytes: Vec<u8> = payloads.iter().flat_map(|p| frame(p)).collect();
        let (got, torn) = records(&bytes).unwrap();
        assert_eq!(got, payloads.iter().map(Vec::as_slice).collect::<Vec<_>>(), "seed {seed}");
        assert_eq!(torn, None);
        let last = frame(payloads.last().unwrap()).len();
        // Cut anywhere inside the last record: the others survive, with a warning.
        for cut in [1, 5, 11, 12, 13, last - 4, last - 1] {
            let (got, torn) = records(&bytes[..bytes.len() - cut]).unwrap();
            assert_eq!(got.len(), payloads.len() - 1, "cut {cut}");
            assert!(torn.unwrap().contains("torn record"), "cut {cut}");
        }
        // A flipped byte in the middle is corruption; in the last record's data, a torn write.
        let mut bad = bytes.clone();
        bad[frame(&payloads[0]).len() + 3] ^= 1;
        assert!(records(&bad).unwrap_err().contains("length checksum"));
        let mut bad = bytes.clone();
        let n = bad.len();
        bad[n - 6] ^= 0x40;
        if payloads.last().unwrap().len() >= 2 {
            assert!(records(&bad).unwrap().1.unwrap().contains("data checksum"));
        }
    }
}
