//! Source/target pairs from JSONL or TSV, and their batching into the id layout transformers'
//! EncoderDecoderModel trains on.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pair {
    pub source: String,
    pub target: String,
}

/// The token ids a batch is framed with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Special {
    pub cls: i32,
    pub sep: i32,
    pub pad: i32,
}

/// The longest line a data file may have, in bytes (a long document is a few tens of KiB).
pub const MAX_LINE_BYTES: usize = 1 << 20;
/// The most examples one data file may hold.
pub const MAX_EXAMPLES: usize = 100_000_000;

/// Opens `path` for reading if it is a regular file (after following links). Devices such as
/// /dev/zero never end, a FIFO blocks the open, a directory fails late: all are refused, naming
/// the file, before anything is read. The check runs before the open so that a FIFO is never
/// opened; the opened file is checked again.
pub fn open_regular(path: &Path) -> Result<File> {
    Ok(jobspec::error::open_regular(path)?)
}

/// The whole of a regular file of at most `max` bytes; a longer file is an input error naming
/// the limit (nothing past `max` is read).
pub fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>> {
    Ok(jobspec::error::read_bounded(path, max)?)
}

/// Calls `each(line_number, text)` for every non-blank line; line numbers are 1-based and count
/// blank lines, so they match what an editor shows. Lines over [`MAX_LINE_BYTES`] are errors.
fn for_each_line(path: &Path, mut each: impl FnMut(usize, &str) -> Result<()>) -> Result<()> {
    let mut reader = BufReader::new(open_regular(path)?);
    let mut buf = Vec::new();
    let mut n = 0;
    loop {
        buf.clear();
        // Bytes, not `lines()`: a bad byte must become an error naming its line, which
        // `lines()` would report as a bare InvalidData. `take` bounds the buffer.
        let limit = MAX_LINE_BYTES as u64 + 1;
        if reader.by_ref().take(limit).read_until(b'\n', &mut buf).map_err(|e| Error::io(path, e))? == 0 {
            return Ok(());
        }
        n += 1;
        if buf.len() > MAX_LINE_BYTES {
            return Err(Error::input(path, format!("line {n}: longer than the limit of {MAX_LINE_BYTES} bytes")));
        }
        let text =
            std::str::from_utf8(&buf).map_err(|e| Error::input(path, format!("line {n}: not valid UTF-8 ({e})")))?;
        // Files saved by Windows editors start with a BOM that JSON parsers reject.
        let text = if n == 1 { text.trim_start_matches('\u{feff}') } else { text };
        let text = text.trim_end_matches(['\n', '\r']);
        if !text.trim().is_empty() {
            each(n, text)?;
        }
    }
}

fn nonempty(path: &Path, pairs: Vec<Pair>) -> Result<Vec<Pair>> {
    if pairs.is_empty() {
        return Err(Error::input(path, "no examples (the file is empty or has only blank lines)"));
    }
    Ok(pairs)
}

/// One JSON object per line; `source_field` and `target_field` name the two strings.
pub fn read_jsonl(path: &Path, source_field: &str, target_field: &str) -> Result<Vec<Pair>> {
    let mut pairs = Vec::new();
    for_each_line(path, |n, line| {
        let v: Value =
            serde_json::from_str(line).map_err(|e| Error::input(path, format!("line {n}: invalid JSON: {e}")))?;
        let obj = v.as_object().ok_or_else(|| Error::input(path, format!("line {n}: expected a JSON object")))?;
        let field = |name: &str| -> Result<String> {
            let val = obj.get(name).ok_or_else(|| Error::input(path, format!("line {n}: missing field `{name}`")))?;
            // The value's type, never the value: the file may hold what the job may not read.
            let s = val.as_str().ok_or_else(|| {
                Error::input(path, format!("line {n}: field `{name}`: expected a string, found {}", json_kind(val)))
            })?;
            if s.trim().is_empty() {
                return Err(Error::input(path, format!("line {n}: field `{name}` is empty")));
            }
            Ok(s.to_owned())
        };
        too_many(path, n, pairs.len())?;
        pairs.push(Pair { source: field(source_field)?, target: field(target_field)? });
        Ok(())
    })?;
    nonempty(path, pairs)
}

fn too_many(path: &Path, line: usize, examples: usize) -> Result<()> {
    if examples >= MAX_EXAMPLES {
        return Err(Error::input(path, format!("line {line}: more than the limit of {MAX_EXAMPLES} examples")));
    }
    Ok(())
}

/// The JSON type of `v`, with its article, for messages that must not echo the value.
pub fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// `source<TAB>target` per line, no header.
pub fn read_tsv(path: &Path) -> Result<Vec<Pair>> {
    let mut pairs = Vec::new();
    for_each_line(path, |n, line| {
        let cols: Vec<&str> = line.split('\t').collect();
        if cols.len() != 2 {
            return Err(Error::input(
                path,
                format!("line {n}: expected 2 tab-separated columns (source, target), found {}", cols.len()),
            ));
        }
        for (col, name) in cols.iter().zip(["source", "target"]) {
            if col.trim().is_empty() {
                return Err(Error::input(path, format!("line {n}: column `{name}` is empty")));
            }
        }
        too_many(path, n, pairs.len())?;
        pairs.push(Pair { source: cols[0].to_owned(), target: cols[1].to_owned() });
        Ok(())
    })?;
    nonempty(path, pairs)
}

/// `.tsv` files are read as TSV, anything else as JSONL.
pub fn read_pairs(path: &Path, source_field: &str, target_field: &str) -> Result<Vec<Pair>> {
    let is_tsv = path.extension().is_some_and(|e| e.eq_ignore_ascii_case("tsv"));
    if is_tsv { read_tsv(path) } else { read_jsonl(path, source_field, target_field) }
}

/// Token ids, one row per text.
pub type IdRows = Vec<Vec<i32>>;

/// Token ids of every source (the encoder's vocabulary) and every target (the decoder's),
/// without special tokens.
pub fn tokenize_pairs(tok: &Tokenizer, pairs: &[Pair]) -> Result<(IdRows, IdRows)> {
    let src: Vec<&str> = pairs.iter().map(|p| p.source.as_str()).collect();
    let tgt: Vec<&str> = pairs.iter().map(|p| p.target.as_str()).collect();
    Ok((tok.encode_source_batch(&src)?, tok.encode_target_batch(&tgt)?))
}

/// The specials each side is framed with: the encoder's around sources, the decoder's on
/// targets. They differ only when the two vocabularies do (`Tokenizer::framing`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Framing {
    pub source: Special,
    pub target: Special,
}

/// One vocabulary frames both sides.
impl From<Special> for Framing {
    fn from(s: Special) -> Self {
        Framing { source: s, target: s }
    }
}

/// How a text's token ids (without special tokens) become model rows, transformers'
/// EncoderDecoderModel's way. Training, evaluation, scoring and generation all frame through
/// these functions, so a text is cut at the same token everywhere.
///
/// The encoder reads `[CLS] source [SEP]`, at most `max_len` ids: the source keeps its first
/// `max_len - 2` tokens.
pub fn encode_source(tokens: &[i32], special: Special, max_len: usize) -> Vec<i32> {
    let kept = &tokens[..source_len(tokens.len(), max_len) - 2];
    let mut row = Vec::with_capacity(kept.len() + 2);
    row.push(special.cls);
    row.extend_from_slice(kept);
    row.push(special.sep);
    row
}

/// The decoder's side of a target, each row at most `max_len` ids: the input `[CLS] target`
/// (the decoder_start_token_id is [CLS]) and the labels `target [SEP]`, the input shifted left
/// by one. The target keeps its first `max_len - 1` tokens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EncodedTarget {
    pub decoder_input: Vec<i32>,
    pub labels: Vec<i32>,
}

/// See [`EncodedTarget`].
pub fn encode_target(tokens: &[i32], special: Special, max_len: usize) -> EncodedTarget {
    let kept = &tokens[..target_len(tokens.len(), max_len) - 1];
    let mut decoder_input = Vec::with_capacity(kept.len() + 1);
    decoder_input.push(special.cls);
    decoder_input.extend_from_slice(kept);
    let mut labels = Vec::with_capacity(kept.len() + 1);
    labels.extend_from_slice(kept);
    labels.push(special.sep);
    EncodedTarget { decoder_input, labels }
}

/// The length of [`encode_source`]'s row for a source of `tokens` ids.
pub fn source_len(tokens: usize, max_len: usize) -> usize {
    tokens.min(max_len.saturating_sub(2)) + 2
}

/// The length of [`encode_target`]'s rows (and the label tokens the loss counts) for a target
/// of `tokens` ids.
pub fn target_len(tokens: usize, max_len: usize) -> usize {
    tokens.min(max_len.saturating_sub(1)) + 1
}

/// One padded batch, row-major: `[batch, src_len]` for the source, `[batch, tgt_len]` for the
/// decoder side.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub batch: usize,
    pub src_len: usize,
    pub tgt_len: usize,
    pub src_ids: Vec<i32>,
    /// 1.0 for a real source token, 0.0 for padding.
    pub src_mask: Vec<f32>,
    pub dec_ids: Vec<i32>,
    /// `kernels::IGNORE_INDEX` where padded.
    pub labels: Vec<i32>,
}

impl Batch {
    /// Frames `src[i]`/`tgt[i]` (ids without special tokens) with [`encode_source`] and
    /// [`encode_target`] under `max_src` / `max_tgt`, and pads the rows to the longest row in
    /// this batch, not to the maximum.
    ///
    /// # Panics
    /// If `src` and `tgt` differ in length, `max_src < 2` or `max_tgt < 1` (callers validate
    /// those limits when they parse them).
    pub fn new(
        src: &[Vec<i32>],
        tgt: &[Vec<i32>],
        framing: impl Into<Framing>,
        max_src: usize,
        max_tgt: usize,
    ) -> Batch {
        let framing = framing.into();
        assert_eq!(src.len(), tgt.len(), "Batch::new: {} sources but {} targets", src.len(), tgt.len());
        assert!(max_src >= 2, "Batch::new: max_src {max_src} leaves no room for [CLS] and [SEP]");
        assert!(max_tgt >= 1, "Batch::new: max_tgt must be at least 1");
        let batch = src.len();
        let sources: Vec<Vec<i32>> = src.iter().map(|s| encode_source(s, framing.source, max_src)).collect();
        let targets: Vec<EncodedTarget> = tgt.iter().map(|t| encode_target(t, framing.target, max_tgt)).collect();
        let src_len = sources.iter().map(Vec::len).max().unwrap_or(0);
        let tgt_len = targets.iter().map(|t| t.labels.len()).max().unwrap_or(0);

        let mut b = Batch {
            batch,
            src_len,
            tgt_len,
            src_ids: vec![framing.source.pad; batch * src_len],
            src_mask: vec![0.0; batch * src_len],
            dec_ids: vec![framing.target.pad; batch * tgt_len],
            labels: vec![kernels::IGNORE_INDEX; batch * tgt_len],
        };
        for (r, (s, t)) in sources.iter().zip(&targets).enumerate() {
            b.src_ids[r * src_len..][..s.len()].copy_from_slice(s);
            b.src_mask[r * src_len..][..s.len()].fill(1.0);
            b.dec_ids[r * tgt_len..][..t.decoder_input.len()].copy_from_slice(&t.decoder_input);
            b.labels[r * tgt_len..][..t.labels.len()].copy_from_slice(&t.labels);
        }
        b
    }

    /// Tokens the loss counts (labels not ignored): the normaliser of a mean token loss.
    pub fn label_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != kernels::IGNORE_INDEX).count()
    }

    /// `label_tokens` per row.
    pub fn example_tokens(&self) -> Vec<usize> {
        if self.tgt_len == 0 {
            return vec![0; self.batch];
        }
        self.labels
            .chunks(self.tgt_len)
            .map(|row| row.iter().filter(|&&l| l != kernels::IGNORE_INDEX).count())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kernels::IGNORE_INDEX as IGN;

    const SP: Special = Special { cls: 101, sep: 102, pad: 0 };

    /// Random token ids in 1000..30000, so none collides with a special id.
    fn rand_ids(seed: u64, len: usize) -> Vec<i32> {
        (0..len as u64).map(|i| 1000 + (kernels::rng::uniform(seed, i) * 29000.0) as i32).collect()
    }

    #[test]
    fn frames_and_pads_like_encoder_decoder_model() {
        let (s0, s1) = (rand_ids(1, 3), rand_ids(2, 1));
        let (t0, t1) = (rand_ids(3, 2), rand_ids(4, 4));
        let b = Batch::new(&[s0.clone(), s1.clone()], &[t0.clone(), t1.clone()], SP, 64, 64);
        assert_eq!((b.batch, b.src_len, b.tgt_len), (2, 5, 5));
        assert_eq!(&b.src_ids[..5], &[101, s0[0], s0[1], s0[2], 102]);
        assert_eq!(&b.src_ids[5..], &[101, s1[0], 102, 0, 0]);
        assert_eq!(b.src_mask, vec![1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0]);
        assert_eq!(&b.dec_ids[..5], &[101, t0[0], t0[1], 0, 0]);
        assert_eq!(&b.labels[..5], &[t0[0], t0[1], 102, IGN, IGN]);
        assert_eq!(&b.dec_ids[5..], &[101, t1[0], t1[1], t1[2], t1[3]]);
        assert_eq!(&b.labels[5..], &[t1[0], t1[1], t1[2], t1[3], 102]);
        // Labels are the decoder input shifted left wherever both are real.
        for r in 0..2 {
            let n = b.example_tokens()[r];
            assert_eq!(&b.dec_ids[r * 5 + 1..r * 5 + n], &b.labels[r * 5..r * 5 + n - 1]);
        }
        assert_eq!(b.example_tokens(), vec![3, 5]);
        assert_eq!(b.label_tokens(), 8);
    }

    #[test]
    fn truncates_to_the_limits() {
        let (s, t) = (rand_ids(5, 40), rand_ids(6, 40));
        let b = Batch::new(&[s.clone(), rand_ids(7, 2)], &[t.clone(), rand_ids(8, 1)], SP, 10, 7);
        assert_eq!((b.src_len, b.tgt_len), (10, 7));
        assert_eq!(b.src_ids[0], 101);
        assert_eq!(&b.src_ids[1..9], &s[..8]);
        assert_eq!(b.src_ids[9], 102, "[SEP] survives truncation");
        assert_eq!(&b.dec_ids[..7], &[&[101][..], &t[..6]].concat()[..]);
        assert_eq!(&b.labels[..7], &[&t[..6], &[102][..]].concat()[..]);
        assert_eq!(b.example_tokens(), vec![7, 2]);
        // The smallest limits still frame every row.
        let b = Batch::new(&[s], &[t], SP, 2, 1);
        assert_eq!((b.src_ids.clone(), b.dec_ids.clone(), b.labels.clone()), (vec![101, 102], vec![101], vec![102]));
        let empty = Batch::new(&[], &[], SP, 8, 8);
        assert_eq!((empty.batch, empty.label_tokens(), empty.example_tokens()), (0, 0, vec![]));
    }

    /// Training and evaluation batches (`Batch::new`) and generation's encoder rows
    /// (`encode_source`) cut a text at the same token: around each limit, the rows equal the
    /// rule written out by hand, and `source_len`/`target_len` (length bucketing, the loss
    /// normaliser) equal the rows' lengths.
    #[test]
    fn every_path_frames_a_text_the_same_at_the_limits() {
        for (seed, max) in [(20, 3), (21, 8), (22, 17)] {
            for n in max - 3..=max + 1 {
                let toks = rand_ids(seed + n as u64, n);
                let (keep_src, keep_tgt) = (n.min(max - 2), n.min(max - 1));
                let want_src = [&[SP.cls][..], &toks[..keep_src], &[SP.sep]].concat();
                let want_dec = [&[SP.cls][..], &toks[..keep_tgt]].concat();
                let want_lab = [&toks[..keep_tgt], &[SP.sep][..]].concat();

                let one = std::slice::from_ref(&toks);
                let b = Batch::new(one, one, SP, max, max);
                let generated = encode_source(&toks, SP, max);
                let target = encode_target(&toks, SP, max);
                let at = format!("max {max}, {n} tokens");
                assert_eq!((&b.src_ids, &generated), (&want_src, &want_src), "{at}");
                assert_eq!((&b.dec_ids, &target.decoder_input), (&want_dec, &want_dec), "{at}");
                assert_eq!((&b.labels, &target.labels), (&want_lab, &want_lab), "{at}");
                assert!(want_src.len() <= max && want_dec.len() <= max, "{at}");
                assert_eq!((source_len(n, max), target_len(n, max)), (want_src.len(), want_lab.len()), "{at}");
                assert_eq!(b.label_tokens(), target_len(n, max), "{at}");
            }
        }
    }

    fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> std::path::PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn err_msg(r: Result<Vec<Pair>>) -> String {
        match r {
            Err(e @ Error::Input { .. }) => e.to_string(),
            other => panic!("expected an input error, got {other:?}"),
        }
    }

    #[test]
    fn reads_jsonl_skipping_blank_lines() {
        let d = tempfile::tempdir().unwrap();
        let p = write(
            &d,
            "a.jsonl",
            "\u{feff}{\"doc\": \"x y\", \"sum\": \"z\", \"id\": 3}\n\n  \r\n{\"sum\": \"q\", \"doc\": \"p\"}\r\n",
        );
        let pairs = read_pairs(&p, "doc", "sum").unwrap();
        assert_eq!(
            pairs,
            vec![Pair { source: "x y".into(), target: "z".into() }, Pair { source: "p".into(), target: "q".into() }]
        );
    }

    #[test]
    fn jsonl_errors_name_the_line_and_field() {
        let d = tempfile::tempdir().unwrap();
        let ok = "{\"source\": \"a\", \"target\": \"b\"}\n";
        let cases = [
            (format!("{ok}\n{{\"source\": \"a\", \"target\"\n"), "line 3: invalid JSON"),
            (format!("{ok}{{\"source\": \"a\"}}\n"), "line 2: missing field `target`"),
            (format!("{ok}{ok}{{\"source\": \"a\", \"target\": \"  \"}}\n"), "line 3: field `target` is empty"),
            (
                "{\"source\": 7, \"target\": \"b\"}\n".to_string(),
                "line 1: field `source`: expected a string, found a number",
            ),
            (format!("{ok}[1, 2]\n"), "line 2: expected a JSON object"),
            ("\n \n".to_string(), "no examples"),
        ];
        for (text, want) in cases {
            let p = write(&d, "bad.jsonl", &text);
            let msg = err_msg(read_jsonl(&p, "source", "target"));
            assert!(msg.contains(want) && msg.contains("bad.jsonl"), "{msg:?} lacks {want:?}");
        }
        let p = d.path().join("utf8.jsonl");
        std::fs::write(&p, b"{\"source\": \"a\", \"target\": \"b\"}\n{\"source\": \"\xff\"}\n").unwrap();
        assert!(err_msg(read_jsonl(&p, "source", "target")).contains("line 2: not valid UTF-8"));
    }

    #[test]
    fn non_regular_files_are_refused_before_reading() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("fifo.jsonl");
        // A FIFO with no writer would block the open forever: it must be refused unopened.
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        for p in [Path::new("/dev/zero"), fifo.as_path(), d.path()] {
            let start = std::time::Instant::now();
            for r in [read_pairs(p, "s", "t"), read_tsv(p)] {
                let msg = err_msg(r);
                assert!(msg.contains("not a regular file") && msg.contains(&*p.to_string_lossy()), "{msg}");
            }
            let e = read_bounded(p, 10).unwrap_err();
            assert!(e.is_bad_input(), "{e}");
            assert!(start.elapsed().as_secs() < 5);
        }
        let p = write(&d, "small", "0123456789");
        assert_eq!(read_bounded(&p, 10).unwrap(), b"0123456789");
        assert!(read_bounded(&p, 9).unwrap_err().to_string().contains("larger than the limit of 9 bytes"));
    }

    #[test]
    fn errors_name_the_type_never_the_value() {
        let d = tempfile::tempdir().unwrap();
        let ok = "{\"creds\": \"a\", \"target\": \"b\"}\n";
        let cases = [
            (
                "{\"creds\": {\"k\": \"SECRET\"}, \"target\": \"b\"}",
                "line 3: field `creds`: expected a string, found an object",
            ),
            ("{\"creds\": [\"SECRET\"], \"target\": \"b\"}", "found an array"),
            ("{\"creds\": true, \"target\": \"SECRET\"}", "found a boolean"),
            ("{\"creds\": \"a\", \"target\": \"SECRET\" \"x\"}", "line 3: invalid JSON"),
            ("[\"SECRET\"]", "line 3: expected a JSON object"),
        ];
        for (line, want) in cases {
            let p = write(&d, "s.jsonl", &format!("{ok}\n{line}\n"));
            let msg = err_msg(read_jsonl(&p, "creds", "target"));
            assert!(msg.contains(want) && !msg.contains("SECRET"), "{msg}");
        }
    }

    #[test]
    fn over_long_lines_are_refused_naming_the_line() {
        let d = tempfile::tempdir().unwrap();
        let long = format!("{{\"source\": \"{}\", \"target\": \"b\"}}", "x".repeat(MAX_LINE_BYTES));
        let p = write(&d, "long.jsonl", &format!("{{\"source\": \"a\", \"target\": \"b\"}}\n{long}\n"));
        let msg = err_msg(read_jsonl(&p, "source", "target"));
        assert!(msg.contains("long.jsonl: line 2: longer than the limit of 1048576 bytes"), "{msg}");
        // No newline at all: still one bounded line.
        let p = write(&d, "long.tsv", &"a\t".repeat(MAX_LINE_BYTES));
        assert!(err_msg(read_tsv(&p)).contains("line 1: longer than the limit"));
        // Exactly at the limit (newline included) is fine.
        let body = "y".repeat(MAX_LINE_BYTES - "a\t\n".len());
        let p = write(&d, "edge.tsv", &format!("a\t{body}\n"));
        assert_eq!(read_tsv(&p).unwrap()[0].target.len(), body.len());
    }

    #[test]
    fn reads_tsv_and_reports_bad_lines() {
        let d = tempfile::tempdir().unwrap();
        let p = write(&d, "a.TSV", "src one\ttgt one\r\n\nsrc two\ttgt two\n");
        assert_eq!(
            read_pairs(&p, "unused", "unused").unwrap(),
            vec![
                Pair { source: "src one".into(), target: "tgt one".into() },
                Pair { source: "src two".into(), target: "tgt two".into() }
            ]
        );
        let p = write(&d, "b.tsv", "a\tb\nonly one column\n");
        assert!(err_msg(read_tsv(&p)).ends_with("line 2: expected 2 tab-separated columns (source, target), found 1"));
        let p = write(&d, "c.tsv", "a\tb\na\tb\tc\n");
        assert!(err_msg(read_tsv(&p)).contains("line 2: expected 2 tab-separated columns"));
        let p = write(&d, "e.tsv", "a\tb\n\na\t \n");
        assert!(err_msg(read_pairs(&p, "s", "t")).ends_with("line 3: column `target` is empty"));
    }

    #[test]
    fn tokenize_pairs_matches_single_encodes() {
        let (_d, tok) = crate::tokenizer::tests::tiny_tokenizer();
        let pairs = vec![
            Pair { source: "the cat sat".into(), target: "a dog".into() },
            Pair { source: "hello".into(), target: "the mat , the cat".into() },
        ];
        let (src, tgt) = tokenize_pairs(&tok, &pairs).unwrap();
        for (i, p) in pairs.iter().enumerate() {
            assert_eq!(src[i], tok.encode_source(&p.source).unwrap());
            assert_eq!(tgt[i], tok.encode_target_batch(&[&p.target]).unwrap()[0]);
        }
        assert_eq!((src[0].len(), tgt[1].len()), (3, 5));
    }
}
