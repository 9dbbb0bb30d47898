//! Property tests of the checkpoint readers over untrusted bytes (issue 11, "fuzz what reads
//! untrusted bytes"): `manifest.json` through `read_manifest` and `verify_manifest`, and
//! `training_state.safetensors` through `read_state`: random bytes and mutations of valid files.
//! Each returns an input error naming the file (or Ok for a file that is still valid) and never
//! panics, hangs or reads past its caps.
//!
//! Cases per run: 5 properties x 256 = 1280.

use std::path::Path;

use model::Error;
use model::pipeline::Cursor;
use proptest::prelude::*;
use worker::state::{self, JobOwner, TrainingState};

const N: usize = 37;

fn training_state() -> TrainingState {
    TrainingState {
        step: 5,
        cursor: Cursor { epoch: 1, step_in_epoch: 2 },
        seed: 3,
        adam_m: (0..N as u64).map(|i| kernels::rng::normal(1, i)).collect(),
        adam_v: (0..N as u64).map(|i| kernels::rng::normal(2, i).abs()).collect(),
    }
}

/// A valid checkpoint directory (fake model files) in `dir`.
fn valid_checkpoint(dir: &Path) {
    std::fs::write(dir.join("config.json"), "{}").unwrap();
    std::fs::write(dir.join("model.safetensors"), [7u8; 24]).unwrap();
    state::write_state(dir, &training_state()).unwrap();
    state::write_manifest(dir, &JobOwner { name: "fuzz".into(), id: Some("job-1".into()) }).unwrap();
}

fn input_error<T>(r: model::Result<T>, file: &Path) -> Result<Option<T>, TestCaseError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(Error::Input { file: f, .. }) => {
            prop_assert!(f.starts_with(file.parent().unwrap()), "error names {}", f.display());
            Ok(None)
        }
        Err(e) => Err(TestCaseError::fail(format!("not an input error: {e:?}"))),
    }
}

fn check_manifest(bytes: &[u8]) -> Result<(), TestCaseError> {
    let d = tempfile::tempdir().unwrap();
    valid_checkpoint(d.path());
    let path = d.path().join(state::MANIFEST_FILE);
    std::fs::write(&path, bytes).unwrap();
    let read = input_error(state::read_manifest(d.path()), &path)?;
    let verified = input_error(state::verify_manifest(d.path()), &path)?;
    // Whatever verifies also reads, and names only plain files of the directory.
    if let Some(m) = verified {
        prop_assert_eq!(read.as_ref(), Some(&m));
        for name in m.files.keys() {
            prop_assert!(d.path().join(name).parent() == Some(d.path()), "{name}");
        }
    }
    Ok(())
}

fn check_state(bytes: &[u8]) -> Result<(), TestCaseError> {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join(state::STATE_FILE);
    std::fs::write(&path, bytes).unwrap();
    if let Some(st) = input_error(state::read_state(d.path(), 8 * N as u64 + 4096), &path)? {
        prop_assert!(st.adam_m.len() * 4 <= bytes.len() && st.adam_v.len() * 4 <= bytes.len());
    }
    Ok(())
}

fn valid_bytes(file: &str) -> Vec<u8> {
    let d = tempfile::tempdir().unwrap();
    valid_checkpoint(d.path());
    std::fs::read(d.path().join(file)).unwrap()
}

fn mutate(mut b: Vec<u8>, flips: &[(prop::sample::Index, u8)], cut: Option<prop::sample::Index>) -> Vec<u8> {
    for (at, byte) in flips {
        let i = at.index(b.len());
        b[i] = *byte;
    }
    if let Some(c) = cut {
        b.truncate(c.index(b.len() + 1));
    }
    b
}

/// Pieces of manifests: valid and hostile entries, formats and owners.
fn manifest_text() -> impl Strategy<Value = String> {
    let name = prop_oneof![
        Just("config.json".to_owned()),
        Just("model.safetensors".to_owned()),
        Just("training_state.safetensors".to_owned()),
        Just("/dev/zero".to_owned()),
        Just("../manifest.json".to_owned()),
        Just(".".to_owned()),
        Just("a/b".to_owned()),
        "\\PC{0,12}",
    ];
    let entry = (name, prop_oneof![Just(0u64), Just(24), Just(u64::MAX), any::<u64>()], "[0-9a-f]{0,64}")
        .prop_map(|(n, b, s)| format!("{:?}: {{\"bytes\": {b}, \"sha256\": {s:?}}}", n));
    let format = prop_oneof![Just("bert2bert-checkpoint-1".to_owned()), "\\PC{0,24}"];
    (format, prop::collection::vec(entry, 0..6), any::<bool>()).prop_map(|(f, entries, job)| {
        let job = if job { r#""job": {"name": "fuzz", "id": "job-1"}, "# } else { "" };
        format!("{{\"format\": {f:?}, {job}\"files\": {{{}}}}}", entries.join(", "))
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// 256 cases of arbitrary bytes as manifest.json.
    #[test]
    fn manifest_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        check_manifest(&bytes)?;
    }

    /// 256 generated manifests with hostile names, sizes, formats and owners.
    #[test]
    fn manifest_hostile_entries(text in manifest_text()) {
        check_manifest(text.as_bytes())?;
    }

    /// 256 byte-level mutations and truncations of a valid manifest.
    #[test]
    fn manifest_mutated(flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
                        cut in proptest::option::of(any::<prop::sample::Index>())) {
        check_manifest(&mutate(valid_bytes(state::MANIFEST_FILE), &flips, cut))?;
    }

    /// 256 cases of arbitrary bytes as the training state.
    #[test]
    fn state_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..700)) {
        check_state(&bytes)?;
    }

    /// 256 mutations of a valid training state: byte flips, truncations, header lengths.
    #[test]
    fn state_mutated(flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
                     cut in proptest::option::of(any::<prop::sample::Index>()),
                     header_len in proptest::option::of(any::<u64>())) {
        let mut b = mutate(valid_bytes(state::STATE_FILE), &flips, cut);
        if let (Some(n), true) = (header_len, b.len() >= 8) {
            b[..8].copy_from_slice(&n.to_le_bytes());
        }
        check_state(&b)?;
    }
}
