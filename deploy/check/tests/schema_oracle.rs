//! The schema layer against an independent oracle: the Kubernetes project's OpenAPI schema as
//! JSON Schema (PyPI `kubernetes-validate`, strict mode: no additional properties), for the same
//! API version. Every object of deploy/k8s, and every one-key mutation of them (a key renamed, a
//! scalar replaced by a mapping), must get the same verdict from both: accepted, or rejected.
//!
//! Needs $B2B_PYTHON with kubernetes-validate (scripts/setup_python.sh); without it the test
//! prints why and passes, unless B2B_REQUIRE_PYTHON=1 (scripts/test.sh sets it), where it fails.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use deploy_check::{Input, KUBERNETES_VERSION, parse_file};
use serde_yaml_ng::{Mapping, Value};

const ORACLE: &str = r#"
import json, sys
import kubernetes_validate
version, docs = sys.argv[1], json.load(sys.stdin)
verdicts = []
for doc in docs:
    try:
        kubernetes_validate.validate(doc, version, strict=True)
        verdicts.append(None)
    except Exception as e:  # ValidationError, SchemaNotFoundError, or a malformed document
        verdicts.append(f"{type(e).__name__}: {str(e).splitlines()[0]}")
json.dump(verdicts, sys.stdout)
"#;

/// The interpreter to use, or None (after printing why) when the test should be skipped.
fn python() -> Option<String> {
    let required = std::env::var("B2B_REQUIRE_PYTHON").is_ok_and(|v| v == "1");
    let why = match std::env::var("B2B_PYTHON") {
        Ok(p) if !p.is_empty() => {
            let probe = Command::new(&p).args(["-c", "import kubernetes_validate"]).output();
            match probe {
                Ok(o) if o.status.success() => return Some(p),
                Ok(o) => format!("{p} cannot import kubernetes_validate: {}", String::from_utf8_lossy(&o.stderr)),
                Err(e) => format!("cannot run {p}: {e}"),
            }
        }
        _ => "B2B_PYTHON is not set".to_owned(),
    };
    assert!(!required, "B2B_REQUIRE_PYTHON=1 but {why} (run scripts/setup_python.sh)");
    eprintln!("schema_oracle: SKIPPED, {why} (export B2B_PYTHON=$(scripts/setup_python.sh))");
    None
}

/// Verdicts of the oracle: None for accepted, Some(reason) for rejected.
fn oracle(python: &str, docs: &[Value]) -> Vec<Option<String>> {
    let mut child = Command::new(python)
        .args(["-c", ORACLE, KUBERNETES_VERSION])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the oracle");
    let json = serde_json::to_vec(docs).expect("YAML documents are JSON");
    child.stdin.take().unwrap().write_all(&json).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the oracle failed: {}", String::from_utf8_lossy(&out.stderr));
    let verdicts: Vec<Option<String>> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(verdicts.len(), docs.len());
    verdicts
}

/// The schema layer's verdict on one document.
fn ours(doc: &Value) -> Option<String> {
    let text = serde_yaml_ng::to_string(doc).unwrap();
    let mut problems = Vec::new();
    parse_file("doc", &text, true, &mut problems);
    (!problems.is_empty()).then(|| problems.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("; "))
}

fn free_form(path: &[String], kind: &str) -> bool {
    let last = path.last().map(String::as_str).unwrap_or("");
    (kind == "Service" && path == ["spec", "selector"])
        || matches!(last, "labels" | "annotations" | "matchLabels" | "data" | "stringData" | "requests" | "limits")
}

/// Every one-key mutation of `doc`: (description, mutated document).
fn mutations(doc: &Value) -> Vec<(String, Value)> {
    let kind = doc.get("kind").and_then(Value::as_str).unwrap_or("").to_owned();
    let mut out = Vec::new();
    let mut stack = vec![(Vec::<String>::new(), doc.clone())];
    while let Some((path, node)) = stack.pop() {
        match node {
            Value::Mapping(m) => {
                for (k, v) in &m {
                    let key = k.as_str().unwrap().to_owned();
                    let mut child = path.clone();
                    child.push(key.clone());
                    if !free_form(&path, &kind) {
                        out.push((format!("rename {}", child.join(".")), edit(doc, &path, |m| rename(m, &key))));
                        if !matches!(v, Value::Mapping(_) | Value::Sequence(_)) {
                            let bogus = Value::Mapping(Mapping::from_iter([("bogus".into(), Value::Bool(true))]));
                            out.push((
                                format!("retype {}", child.join(".")),
                                edit(doc, &path, |m| {
                                    m.insert(Value::String(key.clone()), bogus.clone());
                                }),
                            ));
                        }
                    }
                    stack.push((child, v.clone()));
                }
            }
            Value::Sequence(items) => {
                for (i, v) in items.into_iter().enumerate() {
                    let mut child = path.clone();
                    child.push(i.to_string());
                    stack.push((child, v));
                }
            }
            _ => {}
        }
    }
    out
}

fn rename(m: &mut Mapping, key: &str) {
    let old = std::mem::take(m);
    for (k, v) in old {
        let k = if k.as_str() == Some(key) { Value::String(format!("zz{key}")) } else { k };
        m.insert(k, v);
    }
}

/// A copy of `doc` with `f` applied to the mapping at `path`.
fn edit(doc: &Value, path: &[String], f: impl FnOnce(&mut Mapping)) -> Value {
    let mut copy = doc.clone();
    let node = path.iter().fold(&mut copy, |v, step| match v {
        Value::Sequence(items) => &mut items[step.parse::<usize>().unwrap()],
        Value::Mapping(m) => m.get_mut(step.as_str()).unwrap(),
        _ => unreachable!(),
    });
    let Value::Mapping(m) = node else { unreachable!() };
    f(m);
    copy
}

#[test]
fn schema_layer_agrees_with_the_kubernetes_json_schema() {
    let Some(python) = python() else { return };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../k8s");
    let input = Input::read(&dir, &["tools/toolbox.yaml"]).unwrap_or_else(|p| panic!("{p}"));
    let mut cases: Vec<(String, Value)> = Vec::new();
    for (file, text) in input.files.iter().filter(|(f, _)| !f.starts_with("jobs/")) {
        for doc in serde_yaml_ng::Deserializer::from_str(text) {
            let doc: Value = serde::Deserialize::deserialize(doc).unwrap();
            let name = doc.get("metadata").and_then(|m| m.get("name")).and_then(Value::as_str).unwrap_or("?");
            let at = format!("{file} {name}");
            cases.push((format!("{at}: as committed"), doc.clone()));
            cases.extend(mutations(&doc).into_iter().map(|(what, d)| (format!("{at}: {what}"), d)));
        }
    }
    let docs: Vec<Value> = cases.iter().map(|(_, d)| d.clone()).collect();
    let theirs = oracle(&python, &docs);
    let mut disagreements = Vec::new();
    let (mut accepted, mut rejected) = (0, 0);
    for ((what, doc), theirs) in cases.iter().zip(theirs) {
        let ours = ours(doc);
        match (&ours, &theirs) {
            (None, None) => accepted += 1,
            (Some(_), Some(_)) => rejected += 1,
            _ => disagreements.push(format!("  {what}\n    ours:   {ours:?}\n    oracle: {theirs:?}")),
        }
        if what.ends_with("as committed") {
            assert!(theirs.is_none() && ours.is_none(), "{what}: ours {ours:?}, oracle {theirs:?}");
        }
    }
    assert!(disagreements.is_empty(), "{} disagreements:\n{}", disagreements.len(), disagreements.join("\n"));
    assert!(accepted >= 8 && rejected > 300, "only {accepted} accepted and {rejected} rejected cases");
    eprintln!("schema_oracle: {accepted} accepted and {rejected} rejected by both");
}
