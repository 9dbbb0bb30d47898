//! The part of kustomize's `kustomization.yaml` that deploy/k8s uses. Unknown keys are an
//! error: a field kustomize has but this model lacks would otherwise change the output unseen.

use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Kustomization {
    pub api_version: String,
    pub kind: String,
    /// Set on every namespaced object by kustomize.
    pub namespace: Option<String>,
    #[serde(default)]
    pub resources: Vec<String>,
    #[serde(default)]
    pub images: Vec<Image>,
    pub generator_options: Option<GeneratorOptions>,
    #[serde(default)]
    pub secret_generator: Vec<Generator>,
    #[serde(default)]
    pub config_map_generator: Vec<Generator>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Image {
    /// The image name as the manifests write it.
    pub name: String,
    pub new_name: Option<String>,
    pub new_tag: Option<String>,
    pub digest: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GeneratorOptions {
    #[serde(default)]
    pub disable_name_suffix_hash: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Generator {
    pub name: String,
    #[serde(rename = "type")]
    pub secret_type: Option<String>,
    /// `KEY=PATH` or `PATH` (the key is then the file name).
    #[serde(default)]
    pub files: Vec<String>,
    /// `KEY=VALUE`.
    #[serde(default)]
    pub literals: Vec<String>,
}

impl Generator {
    /// (key, file) for every `files` entry.
    pub fn files(&self) -> impl Iterator<Item = (String, &String)> {
        self.files.iter().map(|f| match f.split_once('=') {
            Some((key, _)) => (key.to_owned(), f),
            None => (f.rsplit('/').next().unwrap_or(f).to_owned(), f),
        })
    }

    /// Every key of the generated object.
    pub fn keys(&self) -> Vec<String> {
        let literal_keys = self.literals.iter().map(|l| l.split_once('=').map_or(l.as_str(), |(k, _)| k).to_owned());
        self.files().map(|(k, _)| k).chain(literal_keys).collect()
    }
}

/// The path part of a `files` entry.
pub fn file_path(entry: &str) -> &str {
    entry.split_once('=').map_or(entry, |(_, path)| path)
}

impl Kustomization {
    pub fn parse(text: &str) -> Result<Kustomization, String> {
        let k: Kustomization = serde_yaml_ng::from_str(text).map_err(|e| e.to_string())?;
        if k.api_version != "kustomize.config.k8s.io/v1beta1" || k.kind != "Kustomization" {
            return Err(format!(
                "apiVersion/kind `{}`/`{}`: expected kustomize.config.k8s.io/v1beta1 Kustomization",
                k.api_version, k.kind
            ));
        }
        Ok(k)
    }

    /// (key, path) of every configMapGenerator file: these are read and checked.
    pub fn config_map_files(&self) -> impl Iterator<Item = (String, &str)> {
        self.config_map_generator.iter().flat_map(|g| g.files()).map(|(key, entry)| (key, file_path(entry)))
    }

    /// Whether generated names keep their names (no content-hash suffix).
    pub fn fixed_generator_names(&self) -> bool {
        self.generator_options.as_ref().is_some_and(|o| o.disable_name_suffix_hash)
    }
}
