//! Where a job may make a worker read and write: allowed roots for data, models, checkpoints
//! and logs. The coordinator checks a submitted job lexically (it may not see the workers'
//! filesystems); a worker checks again when it receives an assignment, with symlinks resolved,
//! before it opens anything. An empty list of roots leaves that kind of path unrestricted.

use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};
use crate::job::{JobSpec, ModelSpec};

/// The allowed roots, by kind of path. Every list empty: no restriction (the default).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PathPolicy {
    /// `data.train`, `data.validation`.
    pub data: Vec<PathBuf>,
    /// `model.init`, `model.encoder`, `model.decoder`.
    pub models: Vec<PathBuf>,
    /// `checkpoint.dir`, `checkpoint.resume_from`, and the checkpoint an assignment resumes from.
    pub checkpoints: Vec<PathBuf>,
    /// `logging.dir`.
    pub logs: Vec<PathBuf>,
}

/// Which roots a path is checked against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathKind {
    Data,
    Models,
    Checkpoints,
    Logs,
}

impl PathKind {
    fn name(self) -> &'static str {
        match self {
            PathKind::Data => "data",
            PathKind::Models => "models",
            PathKind::Checkpoints => "checkpoints",
            PathKind::Logs => "logs",
        }
    }
}

/// `p` made absolute-and-clean without touching the filesystem: `.` dropped, `a/..` removed.
/// `None` for a relative path or one whose `..` climbs above `/`, which no root can hold.
/// Lexical only: `link/..` is not where the symlink's parent is; [`resolve`] handles that.
pub fn normalize(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Prefix(_) | Component::RootDir => out.push(c.as_os_str()),
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() || out.as_os_str().is_empty() {
                    return None;
                }
            }
            Component::Normal(n) => out.push(n),
        }
    }
    out.has_root().then_some(out)
}

/// `p` with every symlink resolved: the longest existing ancestor canonicalised, the rest
/// (which does not exist yet, e.g. a checkpoint dir to be made) appended lexically.
pub fn resolve(p: &Path) -> Option<PathBuf> {
    let p = normalize(p)?;
    let mut existing = p.as_path();
    let mut rest = Vec::new();
    loop {
        match std::fs::canonicalize(existing) {
            Ok(mut real) => {
                real.extend(rest.iter().rev());
                return normalize(&real);
            }
            Err(_) => {
                rest.push(existing.file_name()?.to_owned());
                existing = existing.parent()?;
            }
        }
    }
}

impl PathPolicy {
    /// Every root for every kind.
    pub fn everywhere(roots: &[PathBuf]) -> PathPolicy {
        let r = roots.to_vec();
        PathPolicy { data: r.clone(), models: r.clone(), checkpoints: r.clone(), logs: r }
    }

    pub fn is_unrestricted(&self) -> bool {
        self.data.is_empty() && self.models.is_empty() && self.checkpoints.is_empty() && self.logs.is_empty()
    }

    fn roots(&self, kind: PathKind) -> &[PathBuf] {
        match kind {
            PathKind::Data => &self.data,
            PathKind::Models => &self.models,
            PathKind::Checkpoints => &self.checkpoints,
            PathKind::Logs => &self.logs,
        }
    }

    /// Checks every path of the job lexically (the coordinator's check at submit).
    pub fn check(&self, spec: &JobSpec) -> Result<()> {
        for (key, kind, path) in job_paths(spec) {
            self.check_path(&spec.origin, key, kind, path, normalize)?;
        }
        Ok(())
    }

    /// Checks every path of the job with symlinks resolved, roots included (the worker's check,
    /// before it opens anything).
    pub fn check_resolved(&self, spec: &JobSpec) -> Result<()> {
        for (key, kind, path) in job_paths(spec) {
            self.check_path(&spec.origin, key, kind, path, resolve)?;
        }
        Ok(())
    }

    /// Checks one path under `key` (named in the error, with `origin`), made absolute and
    /// clean by `clean` (the roots too).
    pub fn check_path(
        &self,
        origin: &Path,
        key: &str,
        kind: PathKind,
        path: &Path,
        clean: fn(&Path) -> Option<PathBuf>,
    ) -> Result<()> {
        let roots = self.roots(kind);
        if roots.is_empty() {
            return Ok(());
        }
        let bad = |why: String| Error::input(origin, format!("{key}: {why}"));
        let Some(p) = clean(path) else {
            return Err(bad(format!("{} is not an absolute path inside the allowed roots", path.display())));
        };
        if roots.iter().filter_map(|r| clean(r)).any(|r| p.starts_with(&r)) {
            return Ok(());
        }
        let list: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
        Err(bad(format!("{} is outside the allowed {} roots ({})", path.display(), kind.name(), list.join(", "))))
    }
}

/// Every path a job names, with its key and kind.
fn job_paths(spec: &JobSpec) -> Vec<(&'static str, PathKind, &Path)> {
    let mut v = Vec::new();
    match &spec.model {
        ModelSpec::Init(dir) => v.push(("model.init", PathKind::Models, dir.as_path())),
        ModelSpec::Inline { encoder, decoder, .. } => {
            v.push(("model.encoder", PathKind::Models, encoder.as_path()));
            if let Some(d) = decoder {
                v.push(("model.decoder", PathKind::Models, d.as_path()));
            }
        }
    }
    v.push(("data.train", PathKind::Data, spec.data.train.as_path()));
    if let Some(val) = &spec.data.validation {
        v.push(("data.validation", PathKind::Data, val.as_path()));
    }
    v.push(("checkpoint.dir", PathKind::Checkpoints, spec.checkpoint.dir.as_path()));
    if let Some(r) = &spec.checkpoint.resume_from {
        v.push(("checkpoint.resume_from", PathKind::Checkpoints, r.as_path()));
    }
    v.push(("logging.dir", PathKind::Logs, spec.logging.dir.as_path()));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(dir: &Path) -> JobSpec {
        let yaml = "name: t\nmodel: { init: /models/m }\ndata: { train: /data/train.jsonl }\n\
                    training: { steps: 2, global_batch: 2 }\ncheckpoint: { dir: /ckpt/t }\n";
        JobSpec::from_str(yaml, &dir.join("job.yaml")).unwrap()
    }

    fn roots(s: &[&str]) -> Vec<PathBuf> {
        s.iter().map(PathBuf::from).collect()
    }

    #[test]
    fn normalize_is_lexical_and_refuses_escapes() {
        let n = |s: &str| normalize(Path::new(s)).map(|p| p.display().to_string());
        assert_eq!(n("/a/./b/../c"), Some("/a/c".into()));
        assert_eq!(n("/data/../etc/passwd"), Some("/etc/passwd".into()));
        assert_eq!(n("/.."), None);
        assert_eq!(n("relative/x"), None);
        assert_eq!(n("/"), Some("/".into()));
    }

    #[test]
    fn paths_outside_their_roots_are_refused_naming_the_key() {
        let spec = job(Path::new("/jobs"));
        let open = PathPolicy::default();
        assert!(open.is_unrestricted() && open.check(&spec).is_ok());
        let ok = PathPolicy {
            data: roots(&["/data"]),
            models: roots(&["/models"]),
            checkpoints: roots(&["/ckpt"]),
            logs: roots(&["/ckpt"]),
        };
        ok.check(&spec).unwrap();
        let cases = [
            ("data.train", PathPolicy { data: roots(&["/other"]), ..ok.clone() }),
            ("model.init", PathPolicy { models: roots(&["/mod"]), ..ok.clone() }),
            ("checkpoint.dir", PathPolicy { checkpoints: roots(&["/ckpt/t/x"]), ..ok.clone() }),
            ("logging.dir", PathPolicy { logs: roots(&["/logs"]), ..ok.clone() }),
        ];
        for (key, policy) in cases {
            let e = policy.check(&spec).unwrap_err();
            assert!(e.is_bad_input(), "{e}");
            assert!(e.to_string().contains(&format!("{key}: ")), "{key}: {e}");
            assert!(e.to_string().contains("outside the allowed"), "{e}");
        }
        // `..` cannot climb out of a root, and a sibling with a common prefix is not inside.
        let mut escaping = spec.clone();
        escaping.data.train = PathBuf::from("/data/../etc/shadow");
        assert!(ok.check(&escaping).unwrap_err().to_string().contains("data.train: "));
        escaping.data.train = PathBuf::from("/database/x");
        assert!(ok.check(&escaping).is_err());
        let mut resume = spec.clone();
        resume.checkpoint.resume_from = Some(PathBuf::from("/etc"));
        assert!(ok.check(&resume).unwrap_err().to_string().contains("checkpoint.resume_from: "));
    }

    #[cfg(unix)]
    #[test]
    fn resolved_check_follows_symlinks_out_of_a_root() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("data");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(tmp.path().join("secret.json"), "{}").unwrap();
        std::os::unix::fs::symlink(tmp.path().join("secret.json"), root.join("link.jsonl")).unwrap();
        std::fs::write(root.join("real.jsonl"), "").unwrap();
        let policy = PathPolicy { data: vec![root.clone()], ..PathPolicy::default() };
        let origin = Path::new("job.yaml");
        let check =
            |p: &Path, f: fn(&Path) -> Option<PathBuf>| policy.check_path(origin, "data.train", PathKind::Data, p, f);
        assert!(check(&root.join("link.jsonl"), normalize).is_ok(), "lexically inside");
        let e = check(&root.join("link.jsonl"), resolve).unwrap_err();
        assert!(e.to_string().contains("data.train: "), "{e}");
        assert!(!e.to_string().contains("{}"), "never the file's contents: {e}");
        check(&root.join("real.jsonl"), resolve).unwrap();
        // Not yet existing (e.g. a checkpoint dir to be made) under a real root is fine.
        check(&root.join("new/sub"), resolve).unwrap();
    }
}
