//! deploy/k8s passes the checker, and the checker catches each kind of mistake: every key of
//! every object renamed (an unknown field), every scalar replaced by a mapping (a type error),
//! and hand-made mistakes (a dangling Secret, a probe on an undeclared port, ...), each fed to
//! it as a mutated copy of the real manifests.

use std::path::{Path, PathBuf};

use deploy_check::{Input, Problem, check};
use serde_yaml_ng::{Mapping, Value};

/// Manifests applied by hand next to the kustomization; every one is checked too.
const EXTRAS: &[&str] = &["tools/toolbox.yaml"];

fn k8s_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../k8s")
}

fn real() -> Input {
    Input::read(&k8s_dir(), EXTRAS).unwrap_or_else(|p| panic!("{p}"))
}

fn show(problems: &[Problem]) -> String {
    problems.iter().map(|p| format!("  {p}\n")).collect()
}

#[test]
fn deploy_k8s_passes() {
    let input = real();
    let problems = check(&input);
    assert!(problems.is_empty(), "deploy/k8s has problems:\n{}", show(&problems));
    // Every object kind the deployment needs is there (a file dropped from resources: would
    // otherwise pass as long as nothing referred to it).
    let mut sink = Vec::new();
    let mut kinds: Vec<String> = input
        .files
        .iter()
        .filter(|(f, _)| !f.starts_with("jobs/"))
        .flat_map(|(f, text)| deploy_check::parse_file(f, text, true, &mut sink))
        .map(|o| format!("{}/{}", o.kind_name(), o.name()))
        .collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "Deployment/bert2bert-coordinator",
            "Namespace/bert2bert",
            "NetworkPolicy/bert2bert-client",
            "NetworkPolicy/bert2bert-coordinator",
            "NetworkPolicy/bert2bert-default-deny",
            "NetworkPolicy/bert2bert-worker",
            "PersistentVolumeClaim/bert2bert-coordinator-state",
            "PersistentVolumeClaim/bert2bert-shared",
            "Pod/bert2bert-toolbox",
            "Service/bert2bert-coordinator",
            "Service/bert2bert-workers",
            "StatefulSet/bert2bert-worker",
        ]
    );
}

/// Every YAML file under deploy/k8s is checked: listed in the kustomization, generated from, or an extra.
#[test]
fn no_manifest_escapes_the_check() {
    let input = real();
    let mut on_disk = Vec::new();
    let mut dirs = vec![k8s_dir()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                on_disk.push(path.strip_prefix(k8s_dir()).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    on_disk.retain(|f| f != "kustomization.yaml");
    for f in &on_disk {
        assert!(
            input.files.contains_key(f),
            "deploy/k8s/{f} is checked by nothing: list it in EXTRAS or the kustomization"
        );
    }
}

/// `input` with `from` replaced by `to` in `file`; `from` must occur exactly once, so that a
/// change to the manifests breaks the test loudly instead of making it vacuous.
fn mutated(file: &str, from: &str, to: &str) -> Input {
    let mut input = real();
    let text = input.files.get_mut(file).unwrap_or_else(|| panic!("no file {file}"));
    assert_eq!(text.matches(from).count(), 1, "`{from}` must occur once in {file}");
    *text = text.replacen(from, to, 1);
    input
}

fn assert_caught(input: &Input, expected: &str, what: &str) {
    let problems = check(input);
    assert!(
        problems.iter().any(|p| p.to_string().contains(expected)),
        "{what}: expected a problem containing `{expected}`, got:\n{}",
        show(&problems)
    );
}

#[test]
fn a_misplaced_field_is_caught() {
    // terminationGracePeriodSeconds belongs to the pod, not the container.
    let input = mutated(
        "workers.yaml",
        "        - name: worker\n",
        "        - name: worker\n          terminationGracePeriodSeconds: 120\n",
    );
    assert_caught(&input, "spec.template.spec.containers[0].terminationGracePeriodSeconds: no such field", "misplaced");
    let input = mutated("coordinator.yaml", "          readinessProbe:", "          readinesProbe:");
    assert_caught(&input, "readinesProbe: no such field", "misspelt");
    assert_caught(&input, "has no readinessProbe", "misspelt");
}

#[test]
fn a_dangling_secret_reference_is_caught() {
    let input = mutated(
        "workers.yaml",
        "            secretName: bert2bert-tokens\n",
        "            secretName: bert2bert-token\n",
    );
    assert_caught(&input, "Secret `bert2bert-token` is not in the set", "dangling Secret");
}

#[test]
fn each_kind_of_mistake_is_caught() {
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "workers.yaml",
            "              - key: worker-token\n",
            "              - key: worker-tokn\n",
            "has no key `worker-tokn`",
        ),
        (
            "coordinator.yaml",
            "              port: 7070\n              service:",
            "              port: 7071\n              service:",
            "probes port 7071",
        ),
        (
            "storage.yaml",
            "  name: bert2bert-shared\n  namespace: bert2bert",
            "  name: bert2bert-shared\n  namespace: default",
            "expected `bert2bert`",
        ),
        ("workers.yaml", "        runAsNonRoot: true", "        runAsNonRoot: false", "runAsNonRoot must be true"),
        (
            "coordinator.yaml",
            "            readOnlyRootFilesystem: true",
            "            readOnlyRootFilesystem: false",
            "readOnlyRootFilesystem must be true",
        ),
        ("coordinator.yaml", "              drop: [ALL]", "              drop: [NET_RAW]", "drop must contain ALL"),
        (
            "workers.yaml",
            "http://bert2bert-coordinator:7070",
            "http://bert2bert-coordinatr:7070",
            "no Service `bert2bert-coordinatr`",
        ),
        (
            "workers.yaml",
            "http://bert2bert-coordinator:7070",
            "http://bert2bert-coordinator:7000",
            "serves ports [7070, 9090]",
        ),
        (
            "tools/toolbox.yaml",
            "value: http://bert2bert-coordinator:7070",
            "value: http://bert2bert-coordinator.other.svc:7070",
            "",
        ),
        ("storage.yaml", "accessModes: [ReadWriteMany]", "accessModes: [ReadWriteOnce]", "is not ReadWriteMany"),
        ("coordinator.yaml", "    type: Recreate", "    type: RollingUpdate", "must be Recreate"),
        ("workers.yaml", "            - --ring-advertise=$(POD_IP)\n", "", "needs --ring-advertise"),
        (
            "workers.yaml",
            "--ring-advertise=$(POD_IP)",
            "--ring-advertise=$(POD_ADDRESS)",
            "`$(POD_ADDRESS)` is not an env variable",
        ),
        ("workers.yaml", "--ring-listen=0.0.0.0:7071", "--ring-listen=0.0.0.0:7072", "not a declared containerPort"),
        (
            "workers.yaml",
            "--token-file=/etc/bert2bert/tokens/worker-token",
            "--token-file=/etc/bert2bert/tokens/client-token",
            "has no file `client-token`",
        ),
        ("coordinator.yaml", "--state=/var/lib/bert2bert", "--state=/var/lib/b2b", "is on no volume"),
        ("workers.yaml", "  replicas: 2", "  replicas: 1", "resources.workers: 2 but the worker StatefulSets run 1"),
        (
            "workers.yaml",
            "terminationGracePeriodSeconds: 120",
            "terminationGracePeriodSeconds: 30",
            "terminationGracePeriodSeconds must be at least",
        ),
        (
            "workers.yaml",
            "          mountPath: /var/cache/bert2bert",
            "          mountPath: /var/cache/ptx",
            "PTX cache",
        ),
        (
            "workers.yaml",
            "            limits:\n              cpu: \"8\"\n              memory: 32Gi\n              nvidia.com/gpu: 1\n",
            "            limits:\n              cpu: \"8\"\n              memory: 32Gi\n",
            "nvidia.com/gpu",
        ),
        (
            "workers.yaml",
            "  serviceName: bert2bert-workers",
            "  serviceName: bert2bert-coordinator",
            "not a headless Service",
        ),
        ("workers.yaml", "      targetPort: ring", "      targetPort: rings", "targetPort String(\"rings\")"),
        (
            "tools/toolbox.yaml",
            "        name: bert2bert-jobs",
            "        name: bert2bert-job",
            "ConfigMap `bert2bert-job` is not in the set",
        ),
        (
            "jobs/kjv-cuda.yaml",
            "train: /shared/data/",
            "train: /data/",
            "data.train: /data/kjv_web_sample/train.jsonl is not on a shared volume",
        ),
        ("jobs/kjv-cuda.yaml", "dir: /shared/runs/kjv/ckpt", "dir: runs/kjv/ckpt", "checkpoint.dir: a relative path"),
        ("jobs/kjv-cuda.yaml", "device: cuda", "device: cpu", "training.precision"),
        ("jobs/kjv-cuda.yaml", "  steps: 400", "  stepz: 400", "not a valid job file"),
        (
            "workers.yaml",
            "              port: health\n            periodSeconds: 10",
            "              port: healthz\n            periodSeconds: 10",
            "readinessProbe probes port healthz",
        ),
        (
            "workers.yaml",
            "          livenessProbe:\n            httpGet:\n              path: /healthz\n",
            "          startupProbe:\n            httpGet:\n              path: /healthz\n",
            "(StatefulSet/bert2bert-worker): container `worker` has no livenessProbe",
        ),
        (
            "coordinator.yaml",
            "image: bert2bert@sha256:0000000000000000000000000000000000000000000000000000000000000000",
            "image: bert2bert:0.1.0",
            "is not pinned by digest",
        ),
    ];
    for (file, from, to, expected) in cases {
        let input = mutated(file, from, to);
        let what = format!("{file}: `{from}` -> `{to}`");
        if expected.is_empty() {
            // An address in another namespace is not checked against this set: must still pass.
            let problems = check(&input);
            assert!(problems.is_empty(), "{what}: expected no problem, got:\n{}", show(&problems));
        } else {
            assert_caught(&input, expected, &what);
        }
    }
}

/// The image is pinned in kustomization.yaml `images:` by a well-formed sha256 digest.
#[test]
fn an_image_without_a_digest_is_caught() {
    let digest = "    digest: sha256:0000000000000000000000000000000000000000000000000000000000000000\n";
    for (to, expected) in [
        ("", "has no digest"),
        ("    digest: sha256:00\n", "is not sha256: followed by 64"),
        ("    digest: md5:0000000000000000000000000000000000000000000000000000000000000000\n", "is not sha256:"),
    ] {
        let mut input = real();
        assert_eq!(input.kustomization.matches(digest).count(), 1, "the digest line moved");
        input.kustomization = input.kustomization.replace(digest, to);
        assert_caught(&input, expected, &format!("digest -> `{to}`"));
    }
}

/// Network policies: each slip that would cut a path under the default deny is caught.
#[test]
fn each_network_policy_mistake_is_caught() {
    let cases: &[(&str, &str, &str)] = &[
        // No default deny: pods no policy selects would be open.
        (
            "  policyTypes: [Ingress, Egress]\n---\n# The coordinator",
            "  policyTypes: [Ingress]\n---\n# The coordinator",
            "no default deny",
        ),
        // A client pod without the label can no longer reach the coordinator.
        (
            "    bert2bert.io/client: \"true\"\nspec:",
            "    bert2bert.io/kind: client\nspec:",
            "selected by no NetworkPolicy with rules",
        ),
        // The coordinator's gRPC port closed to everyone.
        (
            "        - protocol: TCP\n          port: 7070\n    # Prometheus",
            "        - protocol: TCP\n          port: 7071\n    # Prometheus",
            "port Int(7071) is served by no container",
        ),
        // A typo in a peer selector.
        (
            "              app.kubernetes.io/component: worker\n        # A pod",
            "              app.kubernetes.io/component: workers\n        # A pod",
            "podSelector selects no pod",
        ),
    ];
    for (from, to, expected) in cases {
        let file =
            if from.contains("bert2bert.io/client: \"true\"\nspec:") { "tools/toolbox.yaml" } else { "network.yaml" };
        assert_caught(&mutated(file, from, to), expected, &format!("{file}: `{from}` -> `{to}`"));
    }
    // Workers that may not reach each other lose the ring (and NCCL).
    let input = mutated(
        "network.yaml",
        "  ingress:\n    - from:\n        - podSelector:\n            matchLabels:\n              app.kubernetes.io/name: bert2bert\n              app.kubernetes.io/component: worker\n  egress:",
        "  ingress: []\n  egress:",
    );
    assert_caught(&input, "dials its peers' ring, but no NetworkPolicy lets it into", "no worker ingress");
    // Workers' egress to the coordinator removed.
    let input = mutated(
        "network.yaml",
        "  egress:\n    - to:\n        - podSelector:\n            matchLabels:\n              app.kubernetes.io/name: bert2bert\n              app.kubernetes.io/component: coordinator\n      ports:\n        - protocol: TCP\n          port: 7070\n    - to:\n        - podSelector:\n            matchLabels:\n              app.kubernetes.io/name: bert2bert\n              app.kubernetes.io/component: worker\n",
        "  egress:\n    - to:\n        - podSelector:\n            matchLabels:\n              app.kubernetes.io/name: bert2bert\n              app.kubernetes.io/component: worker\n",
    );
    assert_caught(
        &input,
        "dials http://bert2bert-coordinator:7070, but no NetworkPolicy lets its egress reach",
        "no egress",
    );
}

/// Keys whose mapping is free-form (any key is valid), so renaming a key there is no mistake.
fn free_form(parent: &[String], kind: &str) -> bool {
    let last = parent.last().map(String::as_str).unwrap_or("");
    let service_selector = kind == "Service" && parent.len() == 2 && parent[0] == "spec" && last == "selector";
    service_selector
        || matches!(last, "labels" | "annotations" | "matchLabels" | "data" | "stringData" | "requests" | "limits")
}

/// Every (path, key) of `value`'s mappings that are schema structs, depth first.
fn struct_keys(value: &Value, path: &mut Vec<String>, kind: &str, out: &mut Vec<(Vec<String>, String)>) {
    match value {
        Value::Mapping(m) => {
            let free = free_form(path, kind);
            for (k, v) in m {
                let k = k.as_str().expect("string keys").to_owned();
                if !free {
                    out.push((path.clone(), k.clone()));
                }
                path.push(k);
                struct_keys(v, path, kind, out);
                path.pop();
            }
        }
        Value::Sequence(items) => {
            for (i, v) in items.iter().enumerate() {
                path.push(i.to_string());
                struct_keys(v, path, kind, out);
                path.pop();
            }
        }
        _ => {}
    }
}

fn node_mut<'a>(value: &'a mut Value, path: &[String]) -> &'a mut Value {
    path.iter().fold(value, |v, step| match v {
        Value::Sequence(items) => &mut items[step.parse::<usize>().unwrap()],
        Value::Mapping(m) => m.get_mut(step.as_str()).unwrap(),
        _ => panic!("no {step}"),
    })
}

fn documents(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text).map(|d| serde::Deserialize::deserialize(d).unwrap()).collect()
}

fn join(docs: &[Value]) -> String {
    docs.iter().map(|d| serde_yaml_ng::to_string(d).unwrap()).collect::<Vec<_>>().join("---\n")
}

/// Every key of every object, renamed one at a time, is reported by name; every scalar,
/// replaced by a mapping, is reported too. The manifests' text round-trips through the YAML
/// library first (comments dropped), and that copy must pass, so only the mutation can fail.
#[test]
fn every_renamed_key_and_retyped_value_is_caught() {
    let base = real();
    let manifest_files: Vec<String> = base.files.keys().filter(|f| !f.starts_with("jobs/")).cloned().collect();
    let mut round_tripped = base.clone();
    for f in &manifest_files {
        round_tripped.files.insert(f.clone(), join(&documents(&base.files[f])));
    }
    assert!(check(&round_tripped).is_empty(), "round trip:\n{}", show(&check(&round_tripped)));

    let (mut renamed, mut retyped) = (0, 0);
    for f in &manifest_files {
        let docs = documents(&round_tripped.files[f]);
        for (d, doc) in docs.iter().enumerate() {
            let kind = doc.get("kind").and_then(Value::as_str).unwrap_or("").to_owned();
            let mut keys = Vec::new();
            struct_keys(doc, &mut Vec::new(), &kind, &mut keys);
            for (path, key) in keys {
                let typo = format!("zz{key}");
                let mut docs2 = docs.clone();
                let Value::Mapping(m) = node_mut(&mut docs2[d], &path) else { unreachable!() };
                let mut renamed_map = Mapping::new();
                for (k, v) in std::mem::take(m) {
                    let k2 = if k.as_str() == Some(key.as_str()) { Value::String(typo.clone()) } else { k };
                    renamed_map.insert(k2, v);
                }
                *m = renamed_map;
                let mut input = round_tripped.clone();
                input.files.insert(f.clone(), join(&docs2));
                let problems = check(&input);
                let top = path.is_empty() && (key == "apiVersion" || key == "kind");
                assert!(
                    problems.iter().any(|p| p.message.contains(&typo)) || (top && !problems.is_empty()),
                    "{f}#{}: renaming {}.{key} went unnoticed:\n{}",
                    d + 1,
                    path.join("."),
                    show(&problems)
                );
                renamed += 1;

                let mut docs3 = docs.clone();
                let mut full = path.clone();
                full.push(key.clone());
                let slot = node_mut(&mut docs3[d], &full);
                if matches!(slot, Value::Mapping(_) | Value::Sequence(_)) {
                    continue;
                }
                let mut bogus = Mapping::new();
                bogus.insert(Value::String("bogus".into()), Value::Bool(true));
                *slot = Value::Mapping(bogus);
                let mut input = round_tripped.clone();
                input.files.insert(f.clone(), join(&docs3));
                assert!(
                    !check(&input).is_empty(),
                    "{f}#{}: a mapping in place of the scalar {} went unnoticed",
                    d + 1,
                    full.join(".")
                );
                retyped += 1;
            }
        }
    }
    // The walk itself must have covered the manifests (about 300 keys today).
    assert!(renamed > 200 && retyped > 100, "only {renamed} keys renamed and {retyped} values retyped");
}

/// The image and the manifests share facts that nothing else ties together: the uid, the PTX
/// cache directory, the Rust version, the CUDA major version the kernels are built for.
#[test]
fn dockerfile_agrees_with_the_manifests() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dockerfile = std::fs::read_to_string(root.join("deploy/Dockerfile")).unwrap();
    let after = |prefix: &str| -> String {
        let line = dockerfile.lines().find_map(|l| l.trim().strip_prefix(prefix));
        let value = line.unwrap_or_else(|| panic!("deploy/Dockerfile has no line starting `{prefix}`"));
        value.split_whitespace().next().unwrap().trim_end_matches('\\').to_owned()
    };
    let uid: i64 = after("ARG UID=").parse().unwrap();
    assert_eq!(after("ENV BERT2BERT_CACHE="), deploy_check::rules::IMAGE_PTX_CACHE);

    // Every pod runs as the image's user, so files on the shared volume have one owner.
    let input = real();
    for (file, text) in input.files.iter().filter(|(f, _)| !f.starts_with("jobs/")) {
        for doc in documents(text) {
            let spec = match doc.get("kind").and_then(Value::as_str) {
                Some("Pod") => doc.get("spec"),
                Some("Deployment" | "StatefulSet" | "Job") => {
                    doc.get("spec").and_then(|s| s.get("template")?.get("spec"))
                }
                _ => continue,
            };
            let sc =
                spec.and_then(|s| s.get("securityContext")).unwrap_or_else(|| panic!("{file}: no securityContext"));
            for key in ["runAsUser", "runAsGroup", "fsGroup"] {
                assert_eq!(sc.get(key).and_then(Value::as_i64), Some(uid), "{file}: securityContext.{key}");
            }
        }
    }

    // The build image's Rust is at least the workspace's rust-version.
    let version = |v: &str| -> Vec<u32> { v.split('.').map(|p| p.parse().unwrap()).collect() };
    let rust_image = after("ARG RUST_IMAGE=rust:");
    let rust = rust_image.split('-').next().unwrap();
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let required = manifest.lines().find_map(|l| l.strip_prefix("rust-version = ")).unwrap().trim_matches('"');
    assert!(version(rust) >= version(required), "Dockerfile builds with Rust {rust}, the workspace needs {required}");

    // The runtime image's CUDA major is the one cudarc is built for (kernels/Cargo.toml, cuda-13000).
    let cuda_image = after("ARG CUDA_IMAGE=nvidia/cuda:");
    let kernels = std::fs::read_to_string(root.join("kernels/Cargo.toml")).unwrap();
    let cudarc_major = kernels.split("\"cuda-").nth(1).and_then(|s| s.get(..2)).unwrap();
    assert!(cuda_image.starts_with(&format!("{cudarc_major}.")), "{cuda_image} vs cudarc cuda-{cudarc_major}xxx");
}
