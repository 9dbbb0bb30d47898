//! `Bert2Bert::pass_with_final_grads`: every range it reports as final really is (backward
//! never writes to it again), the ranges tile the buffer top down, they come early (not all at
//! the end), and the hook changes no gradient bit. Both variants: bertShare's shared storage and
//! the tied word embeddings are the cases where "final" comes late.

use std::ops::Range;
use std::path::Path;

use kernels::{Cpu, IGNORE_INDEX, Memory, rng};
use model::net::{Bert2Bert, Inputs, PassOptions};
use model::testing::{TinyBert, with_keys};
use model::{BertConfig, ModelConfig, ParamTable};

const LAYERS: usize = 3;

fn config(tie: bool) -> ModelConfig {
    let sizes = TinyBert { vocab: 29, hidden: 12, layers: LAYERS, heads: 3, intermediate: 17, positions: 16 };
    let v = with_keys(
        sizes.json(),
        serde_json::json!({"layer_norm_eps": 1e-5, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1}),
    );
    let c = BertConfig::from_value(&v, Path::new("tiny")).unwrap();
    ModelConfig {
        encoder: c.clone(),
        decoder: c,
        tie_encoder_decoder: tie,
        decoder_start_token_id: 2,
        pad_token_id: 0,
        eos_token_id: 3,
    }
}

/// `chunk_rows`: label rows the LM head projects at once (the vocabulary part of its backward
/// then runs chunk by chunk during the loss, before backward proper starts).
fn check(tie: bool, chunk_rows: Option<usize>) {
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    eprintln!("final_grads seed {seed} tie {tie}");
    let cfg = config(tie);
    let table = ParamTable::new(&cfg);
    let n = table.storage_len;
    let params: Vec<f32> = (0..n as u64).map(|i| 0.3 * rng::normal(seed, i)).collect();
    // Earlier micro-batches' gradients: backward accumulates onto them.
    let earlier: Vec<f32> = (0..n as u64).map(|i| rng::normal(seed ^ 9, i)).collect();
    let b = Cpu;
    let mut net = Bert2Bert::new(&b, cfg, table.clone(), &params).unwrap();
    net.set_lm_head_chunk_rows(chunk_rows);
    let (bs, s, t) = (2, 7, 6);
    let id = |i: u64| 4 + (rng::mix(seed ^ 3, i) % 25) as i32;
    let src: Vec<i32> = (0..(bs * s) as u64).map(|i| if i >= 12 { 0 } else { id(i) }).collect();
    let mask: Vec<f32> = src.iter().map(|&x| if x == 0 { 0.0 } else { 1.0 }).collect();
    let dec: Vec<i32> = (0..(bs * t) as u64).map(|i| if i % t as u64 == 0 { 2 } else { id(100 + i) }).collect();
    let labels: Vec<i32> = (0..bs * t).map(|i| if i >= 10 { IGNORE_INDEX } else { id(200 + i as u64) }).collect();
    let x = Inputs::new(&b, bs, s, t, &src, &mask, &dec, &labels).unwrap();
    let opts = PassOptions { train: true, seed: seed ^ 5, label_smoothing: 0.1, grad_scale: Some(0.1) };

    net.grads.copy_from_slice(&earlier);
    net.pass(&b, &x, opts).unwrap();
    let want = b.download(b.view(&net.grads, 0..n)).unwrap();

    net.grads.copy_from_slice(&earlier);
    let mut seen: Vec<(Range<usize>, Vec<f32>)> = Vec::new();
    net.pass_with_final_grads(&b, &x, opts, &mut |range, grads| {
        seen.push((range.clone(), b.download(b.view(grads, range))?));
        Ok(())
    })
    .unwrap();
    let got = b.download(b.view(&net.grads, 0..n)).unwrap();
    assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "the hook changed the gradients");

    let mut top = n;
    for (range, snapshot) in &seen {
        assert_eq!(range.end, top, "ranges must tile the buffer top down: {range:?} after {top}");
        assert!(range.start < range.end, "empty range {range:?}");
        top = range.start;
        let late = range.clone().zip(snapshot).find(|&(i, v)| v.to_bits() != want[i].to_bits());
        if let Some((i, v)) = late {
            let name = &table.owned().find(|e| e.range().contains(&i)).unwrap().name;
            panic!("{range:?} was reported final, but {name} (index {i}) changed after: {v} -> {}", want[i]);
        }
    }
    assert_eq!(top, 0, "the ranges must cover the whole buffer");
    // One range per decoder layer at least (each layer's own or cross-attention weights), so
    // buckets really can start before backward ends.
    assert!(seen.len() > 3, "only {} final ranges", seen.len());
    let lm_head = table.get("decoder.cls.predictions.transform.dense.weight").unwrap().offset;
    assert_eq!(seen[0].0.start, lm_head, "the LM head is final first");
    // Tied storage is final only after its last writer: bertShare's shared layers in encoder
    // backward (after every decoder layer), the decoder word embeddings (tied to the LM head)
    // after the decoder embeddings' backward.
    let late = if tie {
        "encoder.encoder.layer.2.output.dense.weight"
    } else {
        "decoder.bert.embeddings.word_embeddings.weight"
    };
    let start = table.get(late).unwrap().offset;
    let at = seen.iter().position(|(r, _)| r.contains(&start)).unwrap();
    assert!(at > LAYERS, "{late} was reported final in range #{at}, before all decoder layers were done");
}

#[test]
fn final_ranges_are_final_bert2bert() {
    check(false, None);
}

#[test]
fn final_ranges_are_final_bertshare() {
    check(true, None);
}

#[test]
fn final_ranges_are_final_with_the_lm_head_in_chunks_of_3_of_10_rows() {
    check(false, Some(3));
    check(true, Some(3));
}
