//! What the API server would accept but the deployment would not survive: references between
//! objects, probes, the namespace, the security context, volumes, and the job files.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use k8s_openapi::api::core::v1::{Container, PodSpec, Probe, Service, Volume};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::kustomize::Kustomization;
use crate::{Input, Kind, Object, Problem};

/// Where the image keeps NVRTC's PTX cache (`BERT2BERT_CACHE` in deploy/Dockerfile): a writable
/// volume must be mounted there for CUDA workers, whose root filesystem is read-only.
pub const IMAGE_PTX_CACHE: &str = "/var/cache/bert2bert";

/// Shortest grace period for a worker: a step plus rank 0's checkpoint after SIGTERM.
pub const MIN_WORKER_GRACE_S: i64 = 60;

pub(crate) struct Report<'a>(&'a mut Vec<Problem>);

impl Report<'_> {
    pub(crate) fn at(&mut self, at: &str, message: impl Into<String>) {
        self.0.push(Problem { at: at.to_owned(), message: message.into() });
    }
}

/// A pod template (or a bare Pod) with what is needed to check it.
pub(crate) struct Workload<'a> {
    pub(crate) at: &'a str,
    pub(crate) kind: &'static str,
    pub(crate) replicas: i32,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) spec: &'a PodSpec,
}

/// The names (and keys) that references may point to.
#[derive(Default)]
struct Catalog<'a> {
    namespace: String,
    /// Secret name -> keys.
    secrets: BTreeMap<String, BTreeSet<String>>,
    config_maps: BTreeMap<String, BTreeSet<String>>,
    /// PVC name -> access modes.
    claims: BTreeMap<String, Vec<String>>,
    services: BTreeMap<String, &'a Service>,
}

pub fn check_all(k: &Kustomization, input: &Input, objects: &[Object], problems: &mut Vec<Problem>) {
    let mut r = Report(problems);
    let catalog = catalog(k, objects, &mut r);
    let workloads = workloads(objects, &mut r);
    for w in &workloads {
        check_pod(w, &catalog, &mut r);
    }
    check_images(k, &workloads, &mut r);
    check_services(objects, &workloads, &mut r);
    check_claim_sharing(&catalog, &workloads, &mut r);
    check_jobs(k, input, &workloads, &mut r);
    crate::network::check(objects, &workloads, &mut r);
}

fn catalog<'a>(k: &Kustomization, objects: &'a [Object], r: &mut Report) -> Catalog<'a> {
    let mut c = Catalog::default();
    let namespaces: Vec<&Object> = objects.iter().filter(|o| matches!(o.kind, Kind::Namespace(_))).collect();
    match namespaces.as_slice() {
        [ns] => c.namespace = ns.name().to_owned(),
        _ => r.at("kustomization.yaml", format!("expected exactly one Namespace object, found {}", namespaces.len())),
    }
    if let Some(kns) = &k.namespace
        && !c.namespace.is_empty()
        && *kns != c.namespace
    {
        r.at("kustomization.yaml", format!("namespace `{kns}` is not the Namespace object's name `{}`", c.namespace));
    }
    let mut seen = BTreeSet::new();
    for o in objects {
        if o.name().is_empty() {
            r.at(&o.at, "metadata.name is missing");
        }
        if !seen.insert((o.kind_name(), o.name().to_owned())) {
            r.at(&o.at, format!("a second {} named `{}`", o.kind_name(), o.name()));
        }
        let ns = o.metadata().namespace.as_deref();
        if !matches!(o.kind, Kind::Namespace(_)) && ns != Some(c.namespace.as_str()) {
            r.at(
                &o.at,
                format!(
                    "metadata.namespace is {ns:?}, expected `{}` (set it in the file, so `kubectl apply -f` agrees with kustomize)",
                    c.namespace
                ),
            );
        }
        match &o.kind {
            Kind::Secret(s) => {
                let keys = s.data.iter().flat_map(|d| d.keys()).chain(s.string_data.iter().flat_map(|d| d.keys()));
                c.secrets.insert(o.name().to_owned(), keys.cloned().collect());
            }
            Kind::ConfigMap(m) => {
                let keys = m.data.iter().flat_map(|d| d.keys()).chain(m.binary_data.iter().flat_map(|d| d.keys()));
                c.config_maps.insert(o.name().to_owned(), keys.cloned().collect());
            }
            Kind::PersistentVolumeClaim(p) => {
                let modes = p.spec.as_ref().and_then(|s| s.access_modes.clone()).unwrap_or_default();
                if modes.is_empty() {
                    r.at(&o.at, "spec.accessModes is empty");
                }
                c.claims.insert(o.name().to_owned(), modes);
            }
            Kind::Service(s) => {
                c.services.insert(o.name().to_owned(), s);
            }
            _ => {}
        }
    }
    for (generators, what, names) in [
        (&k.secret_generator, "secretGenerator", &mut c.secrets),
        (&k.config_map_generator, "configMapGenerator", &mut c.config_maps),
    ] {
        for g in generators {
            if names.insert(g.name.clone(), g.keys().into_iter().collect()).is_some() {
                r.at("kustomization.yaml", format!("{what} `{}` is also defined as an object", g.name));
            }
        }
    }
    let generates = !k.secret_generator.is_empty() || !k.config_map_generator.is_empty();
    if generates && !k.fixed_generator_names() {
        r.at(
            "kustomization.yaml",
            "generated names get a content hash that the extra manifests (tools/) cannot follow: \
             set generatorOptions.disableNameSuffixHash: true",
        );
    }
    c
}

fn workloads<'a>(objects: &'a [Object], r: &mut Report) -> Vec<Workload<'a>> {
    let mut out = Vec::new();
    for o in objects {
        let (kind, replicas, selector, template) = match &o.kind {
            Kind::Deployment(d) => {
                let s = &d.spec;
                ("Deployment", s.replicas.unwrap_or(1), Some(&s.selector), &s.template)
            }
            Kind::StatefulSet(d) => {
                let s = &d.spec;
                ("StatefulSet", s.replicas.unwrap_or(1), Some(&s.selector), &s.template)
            }
            Kind::Job(j) => {
                let Some(s) = &j.spec else { continue };
                ("Job", s.parallelism.unwrap_or(1), s.selector.as_ref(), &s.template)
            }
            Kind::Pod(p) => {
                let Some(spec) = &p.spec else {
                    r.at(&o.at, "spec is missing");
                    continue;
                };
                let labels = p.metadata.labels.clone().unwrap_or_default();
                out.push(Workload { at: &o.at, kind: "Pod", replicas: 1, labels, spec });
                continue;
            }
            _ => continue,
        };
        let labels = template.metadata.as_ref().and_then(|m| m.labels.clone()).unwrap_or_default();
        if let Some(sel) = selector {
            for (key, value) in sel.match_labels.iter().flatten() {
                if labels.get(key) != Some(value) {
                    r.at(&o.at, format!("spec.selector.matchLabels {key}={value} is not a label of the pod template"));
                }
            }
        }
        let Some(spec) = &template.spec else {
            r.at(&o.at, "spec.template.spec is missing");
            continue;
        };
        match &o.kind {
            Kind::Deployment(d) => check_deployment(o, d, spec, r),
            Kind::StatefulSet(_) => check_probes_present(o, spec, r),
            _ => {}
        }
        out.push(Workload { at: &o.at, kind, replicas, labels, spec });
    }
    out
}

/// The coordinator keeps SQLite on a ReadWriteOnce volume: one pod at a time, old one first.
fn check_deployment(o: &Object, d: &k8s_openapi::api::apps::v1::Deployment, spec: &PodSpec, r: &mut Report) {
    let s = &d.spec;
    let has_claim = spec.volumes.iter().flatten().any(|v| v.persistent_volume_claim.is_some());
    if has_claim {
        if s.replicas.unwrap_or(1) != 1 {
            r.at(&o.at, "a Deployment with a PersistentVolumeClaim (the coordinator's SQLite) must have 1 replica");
        }
        if s.strategy.as_ref().and_then(|st| st.type_.as_deref()) != Some("Recreate") {
            r.at(&o.at, "spec.strategy.type must be Recreate: a rolling update runs two writers on one database");
        }
    }
    check_probes_present(o, spec, r);
}

/// Long-running pods (the coordinator, the workers) need both probes: without readiness a
/// Service sends to a pod that is not serving; without liveness a wedged agent stays forever.
fn check_probes_present(o: &Object, spec: &PodSpec, r: &mut Report) {
    for c in &spec.containers {
        for (probe, name) in [(&c.readiness_probe, "readinessProbe"), (&c.liveness_probe, "livenessProbe")] {
            if probe.is_none() {
                r.at(&o.at, format!("container `{}` has no {name}", c.name));
            }
        }
    }
}

fn check_pod(w: &Workload, c: &Catalog, r: &mut Report) {
    let at = w.at;
    let spec = w.spec;
    let psc = spec.security_context.as_ref();
    if psc.and_then(|s| s.run_as_non_root) != Some(true) {
        r.at(at, "pod securityContext.runAsNonRoot must be true");
    }
    if psc.and_then(|s| s.run_as_user) == Some(0) {
        r.at(at, "pod securityContext.runAsUser is 0 (root)");
    }
    let pod_seccomp = psc.and_then(|s| s.seccomp_profile.as_ref()).map(|p| p.type_.as_str());
    let mut volumes: BTreeMap<&str, &Volume> = BTreeMap::new();
    for v in spec.volumes.iter().flatten() {
        if volumes.insert(v.name.as_str(), v).is_some() {
            r.at(at, format!("two volumes named `{}`", v.name));
        }
        check_volume(at, v, c, r);
    }
    let all = spec.init_containers.iter().flatten().chain(spec.containers.iter());
    for container in all {
        check_container(at, container, pod_seccomp, &volumes, c, r);
    }
    if spec.containers.is_empty() {
        r.at(at, "no containers");
    }
    let is_worker = spec.containers.iter().any(|k| command_of(k).first().map(String::as_str) == Some("worker"));
    if is_worker && spec.termination_grace_period_seconds.unwrap_or(30) < MIN_WORKER_GRACE_S {
        r.at(
            at,
            format!(
                "terminationGracePeriodSeconds must be at least {MIN_WORKER_GRACE_S} for workers: on SIGTERM \
                 they finish the step and checkpoint before leaving"
            ),
        );
    }
}

fn check_volume(at: &str, v: &Volume, c: &Catalog, r: &mut Report) {
    if let Some(s) = &v.secret {
        let name = s.secret_name.as_deref().unwrap_or("");
        match c.secrets.get(name) {
            None => r.at(at, format!("volume `{}`: Secret `{name}` is not in the set", v.name)),
            Some(keys) => check_items(at, &v.name, "Secret", name, keys, s.items.as_deref(), r),
        }
    }
    if let Some(m) = &v.config_map {
        match c.config_maps.get(&m.name) {
            None => r.at(at, format!("volume `{}`: ConfigMap `{}` is not in the set", v.name, m.name)),
            Some(keys) => check_items(at, &v.name, "ConfigMap", &m.name, keys, m.items.as_deref(), r),
        }
    }
    if let Some(p) = &v.persistent_volume_claim
        && !c.claims.contains_key(&p.claim_name)
    {
        r.at(at, format!("volume `{}`: PersistentVolumeClaim `{}` is not in the set", v.name, p.claim_name));
    }
    if v.host_path.is_some() {
        r.at(at, format!("volume `{}`: hostPath is not allowed (restricted pod security)", v.name));
    }
}

fn check_items(
    at: &str,
    volume: &str,
    kind: &str,
    name: &str,
    keys: &BTreeSet<String>,
    items: Option<&[k8s_openapi::api::core::v1::KeyToPath]>,
    r: &mut Report,
) {
    for item in items.unwrap_or_default() {
        if !keys.contains(&item.key) {
            r.at(at, format!("volume `{volume}`: {kind} `{name}` has no key `{}` (keys: {keys:?})", item.key));
        }
    }
}

/// `command` then `args`, as the container runs them (the image's entrypoint is bert2bert, so
/// args alone start with the subcommand).
pub(crate) fn command_of(c: &Container) -> Vec<String> {
    let mut out = c.command.clone().unwrap_or_default();
    out.extend(c.args.clone().unwrap_or_default());
    out
}

/// The value of `--flag` in `args`, as `--flag=value` or `--flag value`.
pub(crate) fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let eq = format!("{name}=");
    args.iter().enumerate().find_map(|(i, a)| {
        if let Some(v) = a.strip_prefix(&eq) {
            Some(v)
        } else if a == name {
            args.get(i + 1).map(String::as_str)
        } else {
            None
        }
    })
}

fn check_container(
    at: &str,
    k: &Container,
    pod_seccomp: Option<&str>,
    volumes: &BTreeMap<&str, &Volume>,
    c: &Catalog,
    r: &mut Report,
) {
    let who = format!("container `{}`", k.name);
    if k.name.is_empty() {
        r.at(at, "a container without a name");
    }
    if k.image.as_deref().unwrap_or("").is_empty() {
        r.at(at, format!("{who}: no image"));
    }
    // Security: non-root, read-only root, no privilege, no capabilities, a seccomp profile.
    let sc = k.security_context.as_ref();
    if sc.and_then(|s| s.allow_privilege_escalation) != Some(false) {
        r.at(at, format!("{who}: securityContext.allowPrivilegeEscalation must be false"));
    }
    if sc.and_then(|s| s.read_only_root_filesystem) != Some(true) {
        r.at(at, format!("{who}: securityContext.readOnlyRootFilesystem must be true"));
    }
    if sc.and_then(|s| s.privileged) == Some(true) {
        r.at(at, format!("{who}: privileged"));
    }
    if sc.and_then(|s| s.run_as_non_root) == Some(false) || sc.and_then(|s| s.run_as_user) == Some(0) {
        r.at(at, format!("{who}: runs as root"));
    }
    let caps = sc.and_then(|s| s.capabilities.as_ref());
    if !caps.and_then(|c| c.drop.as_ref()).is_some_and(|d| d.iter().any(|x| x == "ALL")) {
        r.at(at, format!("{who}: securityContext.capabilities.drop must contain ALL"));
    }
    if caps.and_then(|c| c.add.as_ref()).is_some_and(|a| !a.is_empty()) {
        r.at(at, format!("{who}: adds capabilities"));
    }
    let seccomp = sc.and_then(|s| s.seccomp_profile.as_ref()).map(|p| p.type_.as_str()).or(pod_seccomp);
    if !matches!(seccomp, Some("RuntimeDefault" | "Localhost")) {
        r.at(at, format!("{who}: no seccompProfile RuntimeDefault (pod or container securityContext)"));
    }

    check_resources(at, &who, k, r);

    // Volume mounts and the files the arguments name.
    let mut mounts: Vec<(&str, &Volume)> = Vec::new();
    for m in k.volume_mounts.iter().flatten() {
        match volumes.get(m.name.as_str()) {
            Some(v) => mounts.push((m.mount_path.as_str(), v)),
            None => r.at(at, format!("{who}: volumeMount `{}` names no volume of the pod", m.name)),
        }
    }
    let writable = |path: &str| {
        mounts.iter().any(|(p, v)| *p == path && (v.empty_dir.is_some() || v.persistent_volume_claim.is_some()))
    };
    if !writable("/tmp") {
        r.at(at, format!("{who}: the root filesystem is read-only: mount an emptyDir at /tmp"));
    }
    let args = command_of(k);
    let env: BTreeMap<&str, Option<&str>> =
        k.env.iter().flatten().map(|e| (e.name.as_str(), e.value.as_deref())).collect();
    if flag(&args, "--device").is_some_and(|d| d.starts_with("cuda")) {
        let cache = env.get("BERT2BERT_CACHE").copied().flatten().unwrap_or(IMAGE_PTX_CACHE);
        if !writable(cache) {
            r.at(at, format!("{who}: a CUDA worker writes its PTX cache to {cache}: mount an emptyDir there"));
        }
        let gpus = k.resources.as_ref().and_then(|res| res.limits.as_ref()).and_then(|l| l.get("nvidia.com/gpu"));
        if gpus.is_none_or(|q| q.0 == "0") {
            r.at(at, format!("{who}: --device cuda without a nvidia.com/gpu limit"));
        }
    }
    for arg in &args {
        let value = arg.split_once('=').map_or(arg.as_str(), |(_, v)| v);
        if value.starts_with('/') {
            check_path_arg(at, &who, value, &mounts, c, r);
        }
    }
    if let Some(state) = flag(&args, "--state")
        && !mounts.iter().any(|(p, v)| v.persistent_volume_claim.is_some() && under(state, p))
    {
        r.at(at, format!("{who}: --state {state} is not on a PersistentVolumeClaim: jobs would be lost on restart"));
    }
    if let Some(listen) = flag(&args, "--ring-listen") {
        if (listen.starts_with("0.0.0.0:") || listen.starts_with("[::]:")) && flag(&args, "--ring-advertise").is_none()
        {
            r.at(at, format!("{who}: --ring-listen {listen} needs --ring-advertise (peers cannot dial 0.0.0.0)"));
        }
        let port = listen.rsplit(':').next().and_then(|p| p.parse::<i32>().ok());
        if !port.is_some_and(|p| declared_ports(k).any(|(_, n)| n == p)) {
            r.at(at, format!("{who}: the ring port of --ring-listen {listen} is not a declared containerPort"));
        }
    }

    // `$(VAR)` expands only variables defined on the container; others stay literal.
    for text in args.iter().map(String::as_str).chain(env.values().copied().flatten()) {
        for var in text.split("$(").skip(1).filter_map(|s| s.split_once(')').map(|(v, _)| v)) {
            if !env.contains_key(var) {
                r.at(at, format!("{who}: `$({var})` is not an env variable of the container"));
            }
        }
        check_service_urls(at, &who, text, c, r);
    }
    for e in k.env.iter().flatten() {
        let Some(from) = &e.value_from else { continue };
        if let Some(s) = &from.secret_key_ref
            && !c.secrets.get(&s.name).is_some_and(|keys| keys.contains(&s.key))
        {
            r.at(at, format!("{who}: env {}: Secret `{}` key `{}` is not in the set", e.name, s.name, s.key));
        }
        if let Some(m) = &from.config_map_key_ref
            && !c.config_maps.get(&m.name).is_some_and(|keys| keys.contains(&m.key))
        {
            r.at(at, format!("{who}: env {}: ConfigMap `{}` key `{}` is not in the set", e.name, m.name, m.key));
        }
    }
    for from in k.env_from.iter().flatten() {
        if let Some(s) = &from.secret_ref
            && !c.secrets.contains_key(&s.name)
        {
            r.at(at, format!("{who}: envFrom Secret `{}` is not in the set", s.name));
        }
        if let Some(m) = &from.config_map_ref
            && !c.config_maps.contains_key(&m.name)
        {
            r.at(at, format!("{who}: envFrom ConfigMap `{}` is not in the set", m.name));
        }
    }

    // Ports and probes.
    let mut names = BTreeSet::new();
    for p in k.ports.iter().flatten() {
        if let Some(n) = &p.name
            && (n.len() > 15 || !names.insert(n.as_str()))
        {
            r.at(at, format!("{who}: port name `{n}` is repeated or longer than 15 characters"));
        }
    }
    for (probe, what) in [
        (&k.readiness_probe, "readinessProbe"),
        (&k.liveness_probe, "livenessProbe"),
        (&k.startup_probe, "startupProbe"),
    ] {
        if let Some(probe) = probe {
            check_probe(at, &who, what, probe, k, r);
        }
    }
}

fn check_resources(at: &str, who: &str, k: &Container, r: &mut Report) {
    let res = k.resources.as_ref();
    for (map, what) in
        [(res.and_then(|x| x.requests.as_ref()), "requests"), (res.and_then(|x| x.limits.as_ref()), "limits")]
    {
        for key in ["cpu", "memory"] {
            if !map.is_some_and(|m| m.contains_key(key)) {
                r.at(at, format!("{who}: resources.{what}.{key} is missing"));
            }
        }
    }
    // Extended resources (GPUs) cannot be overcommitted: a request must equal the limit.
    let (requests, limits) = (res.and_then(|x| x.requests.as_ref()), res.and_then(|x| x.limits.as_ref()));
    for (key, want) in requests.iter().flat_map(|m| m.iter()).filter(|(k, _)| k.contains('/')) {
        if limits.and_then(|l| l.get(key)) != Some(want) {
            r.at(at, format!("{who}: resources.requests.{key} must equal resources.limits.{key}"));
        }
    }
}

fn declared_ports(k: &Container) -> impl Iterator<Item = (Option<&str>, i32)> {
    k.ports.iter().flatten().map(|p| (p.name.as_deref(), p.container_port))
}

fn check_probe(at: &str, who: &str, what: &str, p: &Probe, k: &Container, r: &mut Report) {
    let port = |p: &IntOrString| match p {
        IntOrString::Int(n) => declared_ports(k).any(|(_, port)| port == *n),
        IntOrString::String(s) => declared_ports(k).any(|(name, _)| name == Some(s.as_str())),
    };
    let describe = |p: &IntOrString| match p {
        IntOrString::Int(n) => n.to_string(),
        IntOrString::String(s) => s.clone(),
    };
    let served = match (&p.grpc, &p.http_get, &p.tcp_socket, &p.exec) {
        (Some(g), None, None, None) => Some((declared_ports(k).any(|(_, port)| port == g.port), g.port.to_string())),
        (None, Some(h), None, None) => Some((port(&h.port), describe(&h.port))),
        (None, None, Some(t), None) => Some((port(&t.port), describe(&t.port))),
        (None, None, None, Some(_)) => None,
        _ => {
            r.at(at, format!("{who}: {what} needs exactly one of grpc, httpGet, tcpSocket, exec"));
            None
        }
    };
    if let Some((false, port)) = served {
        r.at(at, format!("{who}: {what} probes port {port}, which is not a containerPort of the container"));
    }
}

fn under(path: &str, dir: &str) -> bool {
    path == dir || path.strip_prefix(dir).is_some_and(|rest| rest.starts_with('/') || dir.ends_with('/'))
}

/// An absolute path in the arguments must be on a volume (the root filesystem is read-only and
/// the image holds nothing a flag should name); in a Secret or ConfigMap volume, it must be a key.
fn check_path_arg(at: &str, who: &str, path: &str, mounts: &[(&str, &Volume)], c: &Catalog, r: &mut Report) {
    let Some((dir, v)) = mounts.iter().filter(|(p, _)| under(path, p)).max_by_key(|(p, _)| p.len()) else {
        r.at(at, format!("{who}: argument path {path} is on no volume"));
        return;
    };
    let file = path[dir.len()..].trim_start_matches('/');
    let (kind, name, items, keys) = if let Some(s) = &v.secret {
        let name = s.secret_name.clone().unwrap_or_default();
        ("Secret", name.clone(), s.items.as_deref(), c.secrets.get(&name))
    } else if let Some(m) = &v.config_map {
        ("ConfigMap", m.name.clone(), m.items.as_deref(), c.config_maps.get(&m.name))
    } else {
        return;
    };
    let files: BTreeSet<&str> = match (items, keys) {
        (Some(items), _) => items.iter().map(|i| i.path.as_str()).collect(),
        (None, Some(keys)) => keys.iter().map(String::as_str).collect(),
        (None, None) => return, // the missing object is reported with the volume
    };
    if !files.contains(file) {
        r.at(at, format!("{who}: {path}: the {kind} `{name}` volume at {dir} has no file `{file}` (it has {files:?})"));
    }
}

/// `http(s)://HOST:PORT` naming a Service of the namespace (`name`, `name.ns`, `name.ns.svc...`)
/// must name one that exists, on one of its ports.
fn check_service_urls(at: &str, who: &str, text: &str, c: &Catalog, r: &mut Report) {
    for rest in text.split("://").skip(1) {
        let authority = rest.split(['/', ' ', '"', '\'']).next().unwrap_or("");
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<i32>().ok()),
            None => (authority, None),
        };
        let mut labels = host.split('.');
        let name = labels.next().unwrap_or("");
        let rest: Vec<&str> = labels.collect();
        let in_namespace = match rest.as_slice() {
            [] => true,
            [ns, tail @ ..] => {
                *ns == c.namespace && (tail.is_empty() || tail == ["svc"] || tail == ["svc", "cluster", "local"])
            }
        };
        if !in_namespace || name.parse::<std::net::Ipv4Addr>().is_ok() || host.parse::<std::net::Ipv4Addr>().is_ok() {
            continue;
        }
        let Some(svc) = c.services.get(name) else {
            r.at(at, format!("{who}: {host}: no Service `{name}` in the set"));
            continue;
        };
        let ports: Vec<i32> = svc.spec.iter().flat_map(|s| s.ports.iter().flatten()).map(|p| p.port).collect();
        match port {
            Some(p) if ports.contains(&p) => {}
            _ => r.at(at, format!("{who}: {authority}: Service `{name}` serves ports {ports:?}")),
        }
    }
}

fn check_images(k: &Kustomization, workloads: &[Workload], r: &mut Report) {
    let listed: BTreeSet<&str> = k.images.iter().map(|i| i.name.as_str()).collect();
    let mut used = BTreeSet::new();
    for w in workloads {
        for c in w.spec.init_containers.iter().flatten().chain(&w.spec.containers) {
            let image = c.image.as_deref().unwrap_or("");
            let name = image.split('@').next().unwrap_or(image);
            let name = match name.rsplit_once(':') {
                Some((n, tag)) if !tag.contains('/') => n,
                _ => name,
            };
            used.insert(name);
            // Even where kustomize replaces it: a file applied by hand (tools/) must not fall
            // back to a tag.
            if !image.split_once('@').is_some_and(|(_, d)| is_sha256_digest(d)) {
                r.at(w.at, format!("image `{image}` is not pinned by digest (NAME@sha256:...)"));
            }
            if !listed.contains(name) {
                r.at(
                    w.at,
                    format!("image `{image}` is not in kustomization.yaml images (its registry and tag are set there)"),
                );
            }
        }
    }
    for name in listed.difference(&used) {
        r.at("kustomization.yaml", format!("images: `{name}` is used by no container"));
    }
    // A tag can be moved to other bytes; a digest cannot. kustomize writes NAME@DIGEST when
    // `digest` is set, whatever the tag.
    for i in &k.images {
        match i.digest.as_deref() {
            None => {
                r.at("kustomization.yaml", format!("images: `{}` has no digest: pin it (digest: sha256:...)", i.name))
            }
            Some(d) if !is_sha256_digest(d) => r.at(
                "kustomization.yaml",
                format!("images: `{}` digest `{d}` is not sha256: followed by 64 lowercase hex digits", i.name),
            ),
            Some(_) => {}
        }
    }
}

/// `sha256:` and 64 lowercase hex digits, the only digest form registries hand out today.
pub fn is_sha256_digest(d: &str) -> bool {
    d.strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

fn check_services(objects: &[Object], workloads: &[Workload], r: &mut Report) {
    for o in objects {
        let Kind::Service(s) = &o.kind else { continue };
        let Some(spec) = &s.spec else {
            r.at(&o.at, "spec is missing");
            continue;
        };
        let selector = spec.selector.clone().unwrap_or_default();
        let selected: Vec<&Workload> = workloads
            .iter()
            .filter(|w| !selector.is_empty() && selector.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
            .collect();
        if selected.is_empty() {
            r.at(&o.at, format!("spec.selector {selector:?} selects no pod template of the set"));
        }
        for p in spec.ports.iter().flatten() {
            let target = p.target_port.clone().unwrap_or(IntOrString::Int(p.port));
            for w in &selected {
                let served = w.spec.containers.iter().flat_map(declared_ports).any(|(name, port)| match &target {
                    IntOrString::Int(n) => port == *n,
                    IntOrString::String(t) => name == Some(t.as_str()),
                });
                if !served {
                    r.at(&o.at, format!("port {}: targetPort {target:?} is not a containerPort of {}", p.port, w.at));
                }
            }
        }
    }
    for o in objects {
        let Kind::StatefulSet(s) = &o.kind else { continue };
        let name = s.spec.service_name.clone().unwrap_or_default();
        let headless = objects.iter().any(|x| match &x.kind {
            Kind::Service(svc) => {
                x.name() == name && svc.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some("None")
            }
            _ => false,
        });
        if !headless {
            r.at(&o.at, format!("spec.serviceName `{name}` is not a headless Service (clusterIP: None) of the set"));
        }
    }
}

/// A claim used by more than one pod (several workloads, or replicas > 1) must be ReadWriteMany:
/// ReadWriteOnce would pin every user to one node, or leave pods Pending.
fn check_claim_sharing(c: &Catalog, workloads: &[Workload], r: &mut Report) {
    let mut users: BTreeMap<&str, (i32, Vec<&str>)> = BTreeMap::new();
    for w in workloads {
        for v in w.spec.volumes.iter().flatten() {
            if let Some(p) = &v.persistent_volume_claim {
                let e = users.entry(p.claim_name.as_str()).or_default();
                e.0 += w.replicas.max(1);
                e.1.push(w.at);
            }
        }
    }
    for (claim, (pods, ats)) in users {
        let modes = c.claims.get(claim).map(Vec::as_slice).unwrap_or_default();
        if pods > 1 && !modes.iter().any(|m| m == "ReadWriteMany") {
            r.at(
                ats[0],
                format!("PersistentVolumeClaim `{claim}` is mounted by {pods} pods ({ats:?}) but is not ReadWriteMany"),
            );
        }
    }
}

/// Job files from configMapGenerator: valid for `bert2bert submit`, with absolute paths on the
/// shared volume as every worker mounts it, and no more workers than the StatefulSets run.
fn check_jobs(k: &Kustomization, input: &Input, workloads: &[Workload], r: &mut Report) {
    let workers: Vec<(&Workload, &Container)> = workloads
        .iter()
        .filter(|w| w.kind != "Pod")
        .flat_map(|w| w.spec.containers.iter().map(move |c| (w, c)))
        .filter(|(_, c)| command_of(c).first().map(String::as_str) == Some("worker"))
        .collect();
    let replicas: i32 = workers.iter().map(|(w, _)| w.replicas).sum();
    for (key, path) in k.config_map_files() {
        if !(key.ends_with(".yaml") || key.ends_with(".yml")) {
            continue;
        }
        let Some(text) = input.files.get(path) else { continue };
        // Parsed as if it lived in a directory that exists nowhere: a relative path shows up there.
        let origin = Path::new("/relative-path-in-job").join(key.as_str());
        let spec = match jobspec::JobSpec::from_str(text, &origin) {
            Ok(s) => s,
            Err(e) => {
                r.at(path, format!("not a valid job file: {e}"));
                continue;
            }
        };
        let mut paths = vec![("data.train", spec.data.train.clone()), ("checkpoint.dir", spec.checkpoint.dir.clone())];
        paths.extend(spec.data.validation.clone().map(|p| ("data.validation", p)));
        paths.push(("logging.dir", spec.logging.dir.clone()));
        match &spec.model {
            jobspec::ModelSpec::Init(d) => paths.push(("model.init", d.clone())),
            jobspec::ModelSpec::Inline { encoder, decoder, .. } => {
                paths.push(("model.encoder", encoder.clone()));
                paths.extend(decoder.clone().map(|d| ("model.decoder", d)));
            }
        }
        for (field, p) in &paths {
            let p = p.to_string_lossy();
            if p.starts_with("/relative-path-in-job") {
                r.at(path, format!("{field}: a relative path resolves on the submitting machine; use an absolute one"));
                continue;
            }
            for (w, c) in &workers {
                let shared = c.volume_mounts.iter().flatten().any(|m| {
                    under(&p, &m.mount_path)
                        && w.spec
                            .volumes
                            .iter()
                            .flatten()
                            .any(|v| v.name == m.name && v.persistent_volume_claim.is_some())
                });
                if !shared {
                    r.at(path, format!("{field}: {p} is not on a shared volume of the workers in {}", w.at));
                }
            }
        }
        let device = spec.resources.device.as_str();
        if workers.iter().any(|(_, c)| !flag(&command_of(c), "--device").unwrap_or("cpu").starts_with(device)) {
            r.at(path, format!("resources.device: {device}, but not every worker runs with --device {device}"));
        }
        if spec.resources.workers as i32 > replicas {
            r.at(
                path,
                format!(
                    "resources.workers: {} but the worker StatefulSets run {replicas} replicas",
                    spec.resources.workers
                ),
            );
        }
    }
}
