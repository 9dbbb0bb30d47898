//! Property tests of the safetensors readers over untrusted bytes (issue 11, "fuzz what reads
//! untrusted bytes"): random bytes and mutations of a valid model file (truncation, bit flips,
//! huge header lengths, huge shapes) through `read_tensors` and `load_model_dir`. Each returns an
//! error (or Ok for a file that is still valid), never panics, and never allocates what the file
//! does not hold: a header claiming 2^60 elements is refused before any allocation.
//!
//! Cases per run: 4 properties x 256 = 1024, each through both readers, plus the fixed cases.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use model::{Error, Variant, checkpoint, init, testing, tokenizer::Tokenizer};
use proptest::prelude::*;

/// A valid bert2bert model directory, made once: (dir holding it, model.safetensors bytes).
fn valid() -> &'static (PathBuf, Vec<u8>) {
    static V: OnceLock<(PathBuf, Vec<u8>)> = OnceLock::new();
    V.get_or_init(|| {
        let root = tempfile::tempdir().unwrap().keep();
        let bert = root.join("bert");
        testing::write_bert_dir(&bert, 7, None);
        let tok = Tokenizer::from_file(&bert.join("tokenizer.json")).unwrap();
        let ck = init::warm_start(&bert, Some(&bert), Variant::Bert2Bert, tok.special(), 7).unwrap();
        let dir = root.join("b2b");
        checkpoint::save_model_dir(&dir, &ck, None).unwrap();
        let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
        (dir, bytes)
    })
}

/// Writes `bytes` as model.safetensors of a fresh copy of the valid directory and runs both
/// readers; only input errors are acceptable failures.
fn check(bytes: &[u8]) -> Result<(), TestCaseError> {
    let (valid_dir, _) = valid();
    let d = tempfile::tempdir().unwrap();
    std::fs::copy(valid_dir.join("config.json"), d.path().join("config.json")).unwrap();
    let file = d.path().join("model.safetensors");
    std::fs::write(&file, bytes).unwrap();
    match checkpoint::read_tensors(&file) {
        Ok(ts) => {
            let held: usize = ts.iter().map(|t| t.2.len() * 2).sum();
            prop_assert!(held <= bytes.len(), "read {held}+ bytes of values from a {}-byte file", bytes.len());
        }
        Err(e) => input_error(&e, &file)?,
    }
    match checkpoint::load_model_dir(d.path()) {
        Ok(ck) => prop_assert_eq!(ck.params.len(), ck.table.storage_len),
        Err(e) => input_error(&e, d.path())?,
    }
    Ok(())
}

fn input_error(e: &Error, under: &Path) -> Result<(), TestCaseError> {
    match e {
        Error::Input { file, .. } => prop_assert!(file.starts_with(under), "{e}"),
        other => prop_assert!(false, "not an input error: {other:?}"),
    }
    Ok(())
}

/// A file whose header is `header` (JSON), with `data` after it.
fn with_header(header: &serde_json::Value, data: &[u8]) -> Vec<u8> {
    let h = header.to_string().into_bytes();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out
}

/// The valid file's header as JSON and its data section.
fn split_valid() -> (serde_json::Value, Vec<u8>) {
    let (_, bytes) = valid();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (serde_json::from_slice(&bytes[8..8 + n]).unwrap(), bytes[8 + n..].to_vec())
}

#[test]
fn huge_claims_are_refused_before_allocating() {
    let (_, bytes) = valid();
    check(bytes).unwrap();
    let t = |shape: serde_json::Value, end: u64| {
        serde_json::json!({"encoder.embeddings.word_embeddings.weight":
            {"dtype": "F32", "shape": shape, "data_offsets": [0, end]}})
    };
    for (shape, end) in [
        (serde_json::json!([1u64 << 30, 1u64 << 30]), 16u64),
        (serde_json::json!([1u64 << 60]), 16),
        (serde_json::json!([1u64 << 60]), 1 << 62),
        (serde_json::json!([usize::MAX, 2]), 16),
        (serde_json::json!([1u64 << 62, 0]), 0),
    ] {
        check(&with_header(&t(shape, end), &[0; 16])).unwrap();
    }
    // Header lengths past the file, up to 2^64 - 1.
    for n in [17u64, 1 << 27, 1 << 40, u64::MAX] {
        let mut b = bytes.clone();
        b[..8].copy_from_slice(&n.to_le_bytes());
        check(&b).unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// 256 cases of arbitrary bytes, half of them behind a plausible header length.
    #[test]
    fn arbitrary_bytes(mut bytes in prop::collection::vec(any::<u8>(), 0..600), plausible in any::<bool>()) {
        if plausible && bytes.len() >= 8 {
            let n = (bytes.len() as u64 - 8) / 2;
            bytes[..8].copy_from_slice(&n.to_le_bytes());
        }
        check(&bytes)?;
    }

    /// 256 truncations of the valid file.
    #[test]
    fn truncated(frac in 0.0f64..1.0) {
        let (_, bytes) = valid();
        check(&bytes[..(bytes.len() as f64 * frac) as usize])?;
    }

    /// 256 cases of 1 to 8 bit flips anywhere in the valid file (header included).
    #[test]
    fn bit_flips(flips in prop::collection::vec((any::<prop::sample::Index>(), 0u8..8), 1..9), in_header in any::<bool>()) {
        let (_, bytes) = valid();
        let mut b = bytes.clone();
        let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
        let span = if in_header { 8 + n } else { b.len() };
        for (at, bit) in flips {
            b[at.index(span)] ^= 1 << bit;
        }
        check(&b)?;
    }

    /// 256 cases of one tensor's shape replaced by large dims, offsets kept or stretched to fit.
    #[test]
    fn huge_shapes(which in any::<prop::sample::Index>(), dims in prop::collection::vec(0u32..64, 1..4), stretch in any::<bool>()) {
        let (mut header, data) = split_valid();
        let names: Vec<String> = header.as_object().unwrap().keys().filter(|k| *k != "__metadata__").cloned().collect();
        let name = &names[which.index(names.len())];
        let shape: Vec<u64> = dims.iter().map(|&k| 1u64 << k).collect();
        header[name]["shape"] = serde_json::json!(shape);
        if stretch {
            let start = header[name]["data_offsets"][0].as_u64().unwrap();
            let n = shape.iter().try_fold(4u64, |a, &d| a.checked_mul(d)).unwrap_or(u64::MAX);
            header[name]["data_offsets"][1] = serde_json::json!(start.saturating_add(n));
        }
        check(&with_header(&header, &data))?;
    }
}
