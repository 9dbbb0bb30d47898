//! The emulated NCCL on its own: `csrc/test/nccl_test.cpp` forks three ranks and checks every
//! collective against a reference, bitwise agreement between ranks, and that a dead peer is an
//! async error (not a hang). Built with the same C++ compiler the emulator needs.

#[test]
fn emulated_nccl_collectives_and_dead_peer() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/csrc/test/run_nccl_test.sh");
    let out = std::process::Command::new("bash").arg(script).output().expect("running run_nccl_test.sh");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("nccl_test: all passed"), "{text}");
}
