//! `deploy-check`: validates the Kubernetes manifests in `deploy/k8s` without a cluster.
//!
//! Two layers:
//! - schema: every object is deserialised into the typed `k8s-openapi` structs of one Kubernetes
//!   version. Those structs skip unknown fields silently, so a misplaced or misspelt field (a
//!   `resources:` one level too high, `readinessprobe:`) would pass; `serde_ignored` reports every
//!   skipped field, and each one is a problem here.
//! - references and policy ([`rules`]): what the API server would accept but the deployment
//!   would not survive: a Secret, ConfigMap, PVC or Service that is not in the set, a probe on a
//!   port the container does not declare, an object outside the namespace, a container that may
//!   run as root or write its root filesystem, a job file whose paths are off the shared volume.
//! - network ([`network`]): NetworkPolicies that select no pod, open a port no pod serves, or
//!   leave a workload or a Service port unreachable under the namespace's default deny.
//!
//! [`Input::read`] loads a kustomization directory as text; tests mutate that text and call
//! [`check`] again to show that each kind of mistake is caught.

pub mod kustomize;
pub mod network;
pub mod rules;

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, PersistentVolumeClaim, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde::de::DeserializeOwned;

use crate::kustomize::Kustomization;

/// The Kubernetes version whose schema the objects are checked against (the k8s-openapi feature).
pub const KUBERNETES_VERSION: &str = "1.37";

/// One thing wrong, with where it is: `file#document (Kind/name)` and, when known, a field path.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem {
    pub at: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.at, self.message)
    }
}

/// A kustomization directory as text: `kustomization.yaml`, the files it lists (resources and
/// configMapGenerator files), and extra manifests applied by hand next to it (`tools/`).
/// Secret generator files are never read: they hold the tokens and are not committed.
#[derive(Clone, Debug)]
pub struct Input {
    pub kustomization: String,
    /// Path relative to the kustomization directory -> contents.
    pub files: BTreeMap<String, String>,
    /// Paths (keys of `files`) applied with `kubectl apply -f`, outside the kustomization.
    pub extras: Vec<String>,
}

impl Input {
    /// Reads `dir/kustomization.yaml`, every file it names (except secret generator files) and
    /// `extras` (paths relative to `dir`). A file that cannot be read is an error naming it.
    pub fn read(dir: &Path, extras: &[&str]) -> Result<Input, Problem> {
        let read = |rel: &str| {
            std::fs::read_to_string(dir.join(rel))
                .map_err(|e| Problem { at: dir.join(rel).display().to_string(), message: format!("cannot read: {e}") })
        };
        let kustomization = read("kustomization.yaml")?;
        let k = Kustomization::parse(&kustomization)
            .map_err(|message| Problem { at: "kustomization.yaml".into(), message })?;
        let mut files = BTreeMap::new();
        let listed = k.resources.iter().map(String::as_str).chain(k.config_map_files().map(|(_, path)| path));
        for rel in listed.chain(extras.iter().copied()) {
            files.insert(rel.to_owned(), read(rel)?);
        }
        Ok(Input { kustomization, files, extras: extras.iter().map(|s| s.to_string()).collect() })
    }
}

/// A Kubernetes object that passed the schema layer.
#[derive(Clone, Debug)]
pub struct Object {
    /// `file#N (Kind/name)`, N counting the file's YAML documents from 1.
    pub at: String,
    /// Applied through the kustomization (false: an extra, applied by hand).
    pub in_kustomization: bool,
    pub kind: Kind,
}

// A deployment has a handful of objects: their size does not matter, boxing would only add noise.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug)]
pub enum Kind {
    Namespace(Namespace),
    Deployment(Deployment),
    StatefulSet(StatefulSet),
    Job(Job),
    Pod(Pod),
    Service(Service),
    PersistentVolumeClaim(PersistentVolumeClaim),
    ConfigMap(ConfigMap),
    Secret(Secret),
    NetworkPolicy(NetworkPolicy),
}

impl Object {
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            Kind::Namespace(_) => "Namespace",
            Kind::Deployment(_) => "Deployment",
            Kind::StatefulSet(_) => "StatefulSet",
            Kind::Job(_) => "Job",
            Kind::Pod(_) => "Pod",
            Kind::Service(_) => "Service",
            Kind::PersistentVolumeClaim(_) => "PersistentVolumeClaim",
            Kind::ConfigMap(_) => "ConfigMap",
            Kind::Secret(_) => "Secret",
            Kind::NetworkPolicy(_) => "NetworkPolicy",
        }
    }

    pub fn metadata(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match &self.kind {
            Kind::Namespace(o) => &o.metadata,
            Kind::Deployment(o) => &o.metadata,
            Kind::StatefulSet(o) => &o.metadata,
            Kind::Job(o) => &o.metadata,
            Kind::Pod(o) => &o.metadata,
            Kind::Service(o) => &o.metadata,
            Kind::PersistentVolumeClaim(o) => &o.metadata,
            Kind::ConfigMap(o) => &o.metadata,
            Kind::Secret(o) => &o.metadata,
            Kind::NetworkPolicy(o) => &o.metadata,
        }
    }

    pub fn name(&self) -> &str {
        self.metadata().name.as_deref().unwrap_or("")
    }
}

/// Everything wrong with `input`, sorted; empty when the set is good.
pub fn check(input: &Input) -> Vec<Problem> {
    let mut problems = Vec::new();
    let k = match Kustomization::parse(&input.kustomization) {
        Ok(k) => k,
        Err(message) => return vec![Problem { at: "kustomization.yaml".into(), message }],
    };
    let mut objects = Vec::new();
    let listed = k.resources.iter().map(|r| (r, true));
    for (file, in_kustomization) in listed.chain(input.extras.iter().map(|r| (r, false))) {
        match input.files.get(file) {
            Some(text) => objects.extend(parse_file(file, text, in_kustomization, &mut problems)),
            None => problems.push(Problem { at: file.clone(), message: "listed but not read".into() }),
        }
    }
    rules::check_all(&k, input, &objects, &mut problems);
    problems.sort();
    problems.dedup();
    problems
}

/// The objects of one multi-document YAML file; schema problems go to `problems`.
pub fn parse_file(file: &str, text: &str, in_kustomization: bool, problems: &mut Vec<Problem>) -> Vec<Object> {
    let mut objects = Vec::new();
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let here = format!("{file}#{}", i + 1);
        let value = match serde::Deserialize::deserialize(doc) {
            Ok(serde_yaml_ng::Value::Null) => continue,
            Ok(v) => v,
            Err(e) => {
                problems.push(Problem { at: here, message: format!("not YAML: {e}") });
                break;
            }
        };
        let field = |key: &str| value.get(key).and_then(|v| v.as_str()).unwrap_or("").to_owned();
        let (api_version, kind) = (field("apiVersion"), field("kind"));
        let name = value.get("metadata").and_then(|m| m.get("name")).and_then(|n| n.as_str()).unwrap_or("?");
        let at = format!("{here} ({kind}/{name})");
        let kind = match (api_version.as_str(), kind.as_str()) {
            ("v1", "Namespace") => strict(value, &at, problems).map(Kind::Namespace),
            ("apps/v1", "Deployment") => strict(value, &at, problems).map(Kind::Deployment),
            ("apps/v1", "StatefulSet") => strict(value, &at, problems).map(Kind::StatefulSet),
            ("batch/v1", "Job") => strict(value, &at, problems).map(Kind::Job),
            ("v1", "Pod") => strict(value, &at, problems).map(Kind::Pod),
            ("v1", "Service") => strict(value, &at, problems).map(Kind::Service),
            ("v1", "PersistentVolumeClaim") => strict(value, &at, problems).map(Kind::PersistentVolumeClaim),
            ("v1", "ConfigMap") => strict(value, &at, problems).map(Kind::ConfigMap),
            ("v1", "Secret") => strict(value, &at, problems).map(Kind::Secret),
            ("networking.k8s.io/v1", "NetworkPolicy") => strict(value, &at, problems).map(Kind::NetworkPolicy),
            _ => {
                problems.push(Problem {
                    at: at.clone(),
                    message: format!(
                        "apiVersion `{api_version}` kind `{kind}`: not a kind deploy-check knows \
                         (Namespace, Deployment, StatefulSet, Job, Pod, Service, PersistentVolumeClaim, \
                         ConfigMap, Secret, NetworkPolicy); teach it in deploy/check/src/lib.rs"
                    ),
                });
                None
            }
        };
        if let Some(kind) = kind {
            objects.push(Object { at, in_kustomization, kind });
        }
    }
    objects
}

/// Deserialises `value` into `T`, reporting type errors with their field path and every field
/// the schema does not have.
fn strict<T: DeserializeOwned>(value: serde_yaml_ng::Value, at: &str, problems: &mut Vec<Problem>) -> Option<T> {
    let mut unknown = Vec::new();
    let result = {
        let mut record = |path: serde_ignored::Path<'_>| unknown.push(field_path(&path));
        let de = serde_ignored::Deserializer::new(value, &mut record);
        serde_path_to_error::deserialize::<_, T>(de)
    };
    for path in unknown {
        problems.push(Problem {
            at: at.to_owned(),
            message: format!(
                "{path}: no such field in the Kubernetes {KUBERNETES_VERSION} schema (misspelt, or at the wrong level)"
            ),
        });
    }
    match result {
        Ok(v) => Some(v),
        Err(e) => {
            problems.push(Problem { at: at.to_owned(), message: format!("{}: {}", e.path(), e.inner()) });
            None
        }
    }
}

/// `spec.containers[0].name`, as serde_path_to_error writes paths (serde_ignored's own Display
/// adds a `?` for every optional level).
fn field_path(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path;
    match path {
        Path::Root => String::new(),
        Path::Seq { parent, index } => format!("{}[{index}]", field_path(parent)),
        Path::Map { parent, key } => match field_path(parent) {
            p if p.is_empty() => key.clone(),
            p => format!("{p}.{key}"),
        },
        Path::Some { parent } | Path::NewtypeStruct { parent } | Path::NewtypeVariant { parent } => field_path(parent),
    }
}
