//! The LM head's chunked vocabulary projection on the CPU: the 37 label rows taken 8 at a time
//! (the last chunk 5), one at a time, 36 + 1, or in one chunk larger than needed, give the losses,
//! every gradient (accumulated onto earlier ones) and the logits of the default single chunk, at
//! fp32 tolerance (only the order of the dE and dbias sums over chunks differs). A dropped
//! accumulation across chunks (dbias or dE of the last chunk only) is off by far more.

use kernels::Cpu;
use model::testing::head_chunks::ChunkCase;

#[test]
fn chunked_lm_head_matches_one_chunk_on_the_cpu() {
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    let case = ChunkCase::new(seed);
    assert_eq!(case.label_rows(), 37);
    let whole = case.run(&Cpu, None).unwrap();
    for rows in [8, 1, 36, 64] {
        let got = case.run(&Cpu, Some(rows)).unwrap();
        case.compare(&whole, &got, 2e-5).unwrap_or_else(|e| panic!("seed {seed}, chunks of {rows} rows: {e}"));
    }
    // One chunk of every row is what the CPU does by default: bit for bit.
    let one = case.run(&Cpu, Some(37)).unwrap();
    assert!(one.grads.iter().zip(&whole.grads).all(|(a, b)| a.to_bits() == b.to_bits()), "seed {seed}");
    assert_eq!(one.token_loss, whole.token_loss);
}
