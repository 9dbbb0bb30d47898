//! Checkpoint state and manifests: round trips, damage, ownership, pruning and untrusted input.

use std::path::{Path, PathBuf};

use super::*;

fn state() -> TrainingState {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
    TrainingState {
        step: t % 1000 + 1,
        cursor: Cursor { epoch: 3, step_in_epoch: t % 17 },
        seed: t,
        adam_m: (0..37).map(|i| kernels::rng::normal(t, i)).collect(),
        adam_v: (0..37).map(|i| kernels::rng::normal(t ^ 1, i).abs()).collect(),
    }
}

fn me() -> JobOwner {
    JobOwner { name: "tiny".into(), id: Some("job-3".into()) }
}

/// A checkpoint directory as a save makes it (small fake model files), owned by `owner`.
fn fake_checkpoint(root: &Path, step: u64, owner: &JobOwner) -> PathBuf {
    let dir = checkpoint_dir(root, step);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), "{}").unwrap();
    std::fs::write(dir.join("model.safetensors"), step.to_le_bytes()).unwrap();
    write_state(&dir, &state()).unwrap();
    write_manifest(&dir, owner).unwrap();
    dir
}

fn steps(root: &Path) -> Vec<u64> {
    list_checkpoints(root).iter().map(|c| c.0).collect()
}

#[test]
fn state_round_trips_and_manifest_catches_damage() {
    let d = tempfile::tempdir().unwrap();
    let st = state();
    write_state(d.path(), &st).unwrap();
    assert_eq!(read_state(d.path(), 1 << 20).unwrap(), st);
    let e = read_state(d.path(), 100).unwrap_err().to_string();
    assert!(e.contains("training_state.safetensors") && e.contains("at most 100 bytes"), "{e}");
    std::fs::write(d.path().join("config.json"), "{}").unwrap();
    std::fs::write(d.path().join("model.safetensors"), [1u8, 2, 3]).unwrap();
    write_manifest(d.path(), &me()).unwrap();
    assert_eq!(verify_manifest(d.path()).unwrap().job, Some(me()));
    // Flip one byte of the model: the manifest must reject the directory.
    std::fs::write(d.path().join("model.safetensors"), [1u8, 2, 4]).unwrap();
    let e = verify_manifest(d.path()).unwrap_err().to_string();
    assert!(e.contains("model.safetensors") && e.contains("damaged"), "{e}");
}

#[test]
fn latest_owned_skips_damaged_and_other_jobs_and_prune_keeps_newest() {
    let root = tempfile::tempdir().unwrap();
    for step in [10u64, 20, 30] {
        fake_checkpoint(root.path(), step, &me());
    }
    let other = JobOwner { name: "tiny".into(), id: Some("job-9".into()) };
    fake_checkpoint(root.path(), 40, &other);
    std::fs::create_dir_all(root.path().join("step-00000050.tmp")).unwrap();
    std::fs::write(checkpoint_dir(root.path(), 30).join("model.safetensors"), b"torn").unwrap();
    assert_eq!(latest_owned(root.path(), &me()), Some(checkpoint_dir(root.path(), 20)));
    // A local run of the same name owns what a coordinator run of it wrote.
    assert_eq!(latest_owned(root.path(), &JobOwner::local("tiny")), Some(checkpoint_dir(root.path(), 40)));
    assert_eq!(latest_owned(root.path(), &JobOwner::local("other")), None);
    let foreign = foreign_checkpoints(root.path(), &me());
    assert_eq!(foreign, vec![(checkpoint_dir(root.path(), 40), "job `tiny` (job-9)".to_owned())]);
    // keep 1: the damaged 30 does not count, 20 is kept, 10 goes; 40 is another job's.
    let gone = prune(root.path(), 1, &me()).unwrap();
    assert_eq!(gone, vec![checkpoint_dir(root.path(), 10)]);
    assert_eq!(steps(root.path()), vec![20, 30, 40]);
}

/// Issue 11 item 2: an empty `step-00000099/` with keep 1 must not cost the real checkpoints,
/// and user files inside a checkpoint or beside them are never deleted.
#[test]
fn prune_never_deletes_what_is_not_a_verified_checkpoint_of_this_job() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    for step in [1u64, 3, 6] {
        fake_checkpoint(r, step, &me());
    }
    std::fs::create_dir_all(checkpoint_dir(r, 99)).unwrap();
    std::fs::write(checkpoint_dir(r, 1).join("notes.txt"), "mine").unwrap();
    std::fs::write(r.join("results.txt"), "mine too").unwrap();
    let legacy = checkpoint_dir(r, 2);
    fake_checkpoint(r, 2, &me());
    // A manifest from before checkpoints named their job: not ours to delete.
    let m = std::fs::read_to_string(legacy.join("manifest.json")).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&m).unwrap();
    v.as_object_mut().unwrap().remove("job");
    std::fs::write(legacy.join("manifest.json"), v.to_string()).unwrap();

    prune(r, 1, &me()).unwrap();
    assert_eq!(steps(r), vec![1, 2, 6, 99], "the newest valid checkpoint (6) is kept, 3 is pruned");
    assert!(verify_manifest(&checkpoint_dir(r, 6)).is_ok());
    let left: Vec<_> = std::fs::read_dir(checkpoint_dir(r, 1)).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, ["notes.txt"], "the pruned checkpoint's files went, the user's file stayed");
    assert_eq!(std::fs::read_to_string(r.join("results.txt")).unwrap(), "mine too");
    assert!(verify_manifest(&legacy).is_ok() && checkpoint_dir(r, 99).is_dir());
    // Nothing of this job verifies: nothing is deleted at all.
    std::fs::write(checkpoint_dir(r, 6).join("model.safetensors"), b"torn").unwrap();
    assert!(prune(r, 1, &me()).unwrap().is_empty());
    assert_eq!(steps(r), vec![1, 2, 6, 99]);
}

/// Pruning remembers what it verified (no re-hashing of every kept checkpoint at each save), but
/// a checkpoint whose files changed since is verified again, never counted from memory.
#[test]
fn prune_reverifies_a_checkpoint_that_changed_since_it_was_verified() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    for step in [1u64, 2, 3] {
        fake_checkpoint(r, step, &me());
    }
    assert!(prune(r, 3, &me()).unwrap().is_empty(), "all three verify and are kept");
    // Same size, other bytes, a later mtime: what a rewrite in place looks like.
    let model = checkpoint_dir(r, 3).join("model.safetensors");
    let len = std::fs::metadata(&model).unwrap().len() as usize;
    std::fs::write(&model, vec![0xA5u8; len]).unwrap();
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(10);
    std::fs::File::options().write(true).open(&model).unwrap().set_modified(later).unwrap();
    // keep 1: the damaged 3 must not count, so 2 is the one kept and only 1 goes.
    assert_eq!(prune(r, 1, &me()).unwrap(), vec![checkpoint_dir(r, 1)]);
    assert_eq!(steps(r), vec![2, 3]);
}

/// Issue 11 item 9: manifest entries outside the directory, non-regular files and unknown
/// formats are refused before anything is read.
#[test]
fn manifest_entries_must_be_regular_files_inside_the_directory() {
    let root = tempfile::tempdir().unwrap();
    let dir = fake_checkpoint(root.path(), 1, &me());
    let good = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
    let with = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
        edit(&mut v);
        std::fs::write(dir.join("manifest.json"), v.to_string()).unwrap();
        let t0 = std::time::Instant::now();
        let e = verify_manifest(&dir).unwrap_err().to_string();
        assert!(t0.elapsed().as_secs() < 5, "took {:?}", t0.elapsed());
        e
    };
    let entry = serde_json::json!({"bytes": 1u64 << 40, "sha256": "00"});
    for name in ["/dev/zero", "../step-00000001/config.json", "a/b", "..", ""] {
        let e = with(&|v| {
            v["files"][name] = entry.clone();
        });
        assert!(e.contains("is not a file name inside the checkpoint"), "{name}: {e}");
    }
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink("/dev/zero", dir.join("zero")).unwrap();
        let e = with(&|v| v["files"]["zero"] = entry.clone());
        assert!(e.contains("zero: is not a regular file"), "{e}");
    }
    let e = with(&|v| v["format"] = "bert2bert-checkpoint-0".into());
    assert!(e.contains("unknown `format`"), "{e}");
    let e = with(&|v| v["files"]["config.json"]["bytes"] = 1000.into());
    assert!(e.contains("config.json: size differs"), "{e}");
    let e = with(&|v| v["files"]["config.json"]["bytes"] = "secret-value".into());
    assert!(e.contains("not a checkpoint manifest") && !e.contains("secret"), "{e}");
    // An oversized manifest is refused by its size.
    std::fs::write(dir.join("manifest.json"), vec![b' '; (1 << 20) + 1]).unwrap();
    assert!(verify_manifest(&dir).unwrap_err().to_string().contains("at most"));
}

/// A prune renames the checkpoint aside before deleting it, so a kill part way (here: after the
/// rename, with some files gone) leaves no `step-` directory that fails to verify, and the next
/// start's `remove_stale_partials` finishes the job. A prune that completes leaves nothing.
#[test]
fn a_prune_cut_short_leaves_no_half_deleted_checkpoint() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    for step in [1u64, 2, 3] {
        let dir = fake_checkpoint(r, step, &me());
        std::fs::write(dir.join(model::checkpoint::WRITER_FILE), me().writer_tag()).unwrap();
        write_manifest(&dir, &me()).unwrap();
    }
    assert_eq!(prune(r, 2, &me()).unwrap(), vec![checkpoint_dir(r, 1)]);
    let names = |r: &Path| {
        let mut n: Vec<String> =
            std::fs::read_dir(r).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        n.sort();
        n
    };
    assert_eq!(names(r), ["step-00000002", "step-00000003"]);
    // What a kill after the rename leaves: the directory aside, partly emptied.
    let aside = r.join("step-00000002.old.77.0.5");
    std::fs::rename(checkpoint_dir(r, 2), &aside).unwrap();
    std::fs::remove_file(aside.join("model.safetensors")).unwrap();
    std::fs::remove_file(aside.join("manifest.json")).unwrap();
    assert_eq!(steps(r), vec![3], "nothing half-deleted looks like a checkpoint");
    assert_eq!(remove_stale_partials(r, &me()).unwrap(), vec![aside]);
    assert_eq!(names(r), ["step-00000003"]);
}
