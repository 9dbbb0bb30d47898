//! NetworkPolicies against the pods they govern. The API server accepts a policy whose selector
//! matches nothing or whose port no pod serves; under a default deny such a slip silently cuts a
//! path the deployment needs (a worker that cannot reach the coordinator just retries for ever).
//! So: a default deny must exist, every selector must select a pod of the set, every port must
//! be served, every Service port must be open to someone, every workload must be governed by a
//! policy with rules, and every coordinator URL a container dials must be open to its egress.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::rules::{Report, Workload, command_of, flag};
use crate::{Kind, Object};

/// Whether `selector` selects a pod with `labels` (an empty selector selects every pod).
pub fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let by_labels = selector.match_labels.iter().flatten().all(|(k, v)| labels.get(k) == Some(v));
    let by_expressions = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        match (e.operator.as_str(), labels.get(&e.key)) {
            ("In", Some(v)) => values.contains(v),
            ("NotIn", v) => v.is_none_or(|v| !values.contains(v)),
            ("Exists", v) => v.is_some(),
            ("DoesNotExist", v) => v.is_none(),
            _ => false,
        }
    });
    by_labels && by_expressions
}

/// A policy with its effective types: Ingress always, Egress when listed or when it has egress
/// rules (the API server's defaulting).
struct Policy<'a> {
    at: &'a str,
    selector: LabelSelector,
    p: &'a NetworkPolicy,
    ingress: bool,
    egress: bool,
}

impl Policy<'_> {
    fn governs(&self, w: &Workload) -> bool {
        selects(&self.selector, &w.labels)
    }

    fn is_default_deny(&self) -> bool {
        let spec = self.p.spec.as_ref();
        let no_rules = spec.is_some_and(|s| s.ingress.as_ref().is_none_or(Vec::is_empty))
            && spec.is_some_and(|s| s.egress.as_ref().is_none_or(Vec::is_empty));
        self.selector == LabelSelector::default() && self.ingress && self.egress && no_rules
    }

    fn has_rules(&self) -> bool {
        let spec = self.p.spec.as_ref();
        spec.is_some_and(|s| s.ingress.iter().flatten().next().is_some() || s.egress.iter().flatten().next().is_some())
    }

    /// (peers, ports) of every ingress rule.
    fn ingress_rules(&self) -> Vec<(&[NetworkPolicyPeer], &[NetworkPolicyPort])> {
        let rules = self.p.spec.iter().flat_map(|s| s.ingress.iter().flatten());
        rules.map(|r| (r.from.as_deref().unwrap_or_default(), r.ports.as_deref().unwrap_or_default())).collect()
    }

    fn egress_rules(&self) -> Vec<(&[NetworkPolicyPeer], &[NetworkPolicyPort])> {
        let rules = self.p.spec.iter().flat_map(|s| s.egress.iter().flatten());
        rules.map(|r| (r.to.as_deref().unwrap_or_default(), r.ports.as_deref().unwrap_or_default())).collect()
    }
}

/// A peer in this namespace (a pod selector alone), as opposed to other namespaces or IP blocks.
fn local_pods(peer: &NetworkPolicyPeer) -> Option<&LabelSelector> {
    match (peer, &peer.namespace_selector, &peer.ip_block) {
        (NetworkPolicyPeer { pod_selector: Some(s), .. }, None, None) => Some(s),
        _ => None,
    }
}

/// Whether `ports` (empty: all) lets TCP traffic to container port `port` (named `name`) through.
fn port_allowed(ports: &[NetworkPolicyPort], port: i32, name: Option<&str>) -> bool {
    ports.is_empty()
        || ports.iter().any(|p| {
            let tcp = p.protocol.as_deref().unwrap_or("TCP") == "TCP";
            let hit = match &p.port {
                None => true,
                Some(IntOrString::Int(n)) => (*n..=p.end_port.unwrap_or(*n)).contains(&port),
                Some(IntOrString::String(s)) => name == Some(s.as_str()),
            };
            tcp && hit
        })
}

/// (name, port, protocol) of every container port of `w`.
fn served<'a>(w: &'a Workload<'a>) -> impl Iterator<Item = (Option<&'a str>, i32, &'a str)> {
    let ports = w.spec.containers.iter().flat_map(|c| c.ports.iter().flatten());
    ports.map(|p| (p.name.as_deref(), p.container_port, p.protocol.as_deref().unwrap_or("TCP")))
}

pub(crate) fn check(objects: &[Object], workloads: &[Workload], r: &mut Report) {
    let mut policies = Vec::new();
    for o in objects {
        let Kind::NetworkPolicy(p) = &o.kind else { continue };
        let Some(spec) = &p.spec else {
            r.at(&o.at, "spec is missing");
            continue;
        };
        let types = spec.policy_types.clone().unwrap_or_default();
        let has_egress = spec.egress.as_ref().is_some_and(|e| !e.is_empty());
        let selector = spec.pod_selector.clone().unwrap_or_default();
        let egress = types.iter().any(|t| t == "Egress") || (types.is_empty() && has_egress);
        policies.push(Policy { at: &o.at, selector, p, ingress: true, egress });
    }
    if policies.is_empty() {
        return;
    }
    if !policies.iter().any(Policy::is_default_deny) {
        r.at(
            "NetworkPolicies",
            "no default deny (podSelector: {}, policyTypes: [Ingress, Egress], no rules): \
             pods that no policy selects are open to the whole cluster",
        );
    }
    for p in &policies {
        check_selectors(p, workloads, r);
    }
    for w in workloads {
        if !policies.iter().any(|p| p.has_rules() && p.governs(w)) {
            r.at(w.at, "selected by no NetworkPolicy with rules: under the default deny it can reach nothing");
        }
    }
    check_service_ports(objects, workloads, &policies, r);
    check_dials(objects, workloads, &policies, r);
}

/// Every selector selects a pod of the set, and every port a rule opens is one those pods serve.
fn check_selectors(p: &Policy, workloads: &[Workload], r: &mut Report) {
    let governed: Vec<&Workload> = workloads.iter().filter(|w| p.governs(w)).collect();
    if governed.is_empty() {
        r.at(p.at, format!("spec.podSelector {:?} selects no pod of the set", p.selector.match_labels));
    }
    for (what, rules) in [("ingress", p.ingress_rules()), ("egress", p.egress_rules())] {
        for (i, (peers, ports)) in rules.into_iter().enumerate() {
            let mut targets = governed.clone();
            for (j, peer) in peers.iter().enumerate() {
                let Some(sel) = local_pods(peer) else { continue };
                let hits: Vec<&Workload> = workloads.iter().filter(|w| selects(sel, &w.labels)).collect();
                if hits.is_empty() {
                    let key = if what == "ingress" { "from" } else { "to" };
                    r.at(p.at, format!("spec.{what}[{i}].{key}[{j}].podSelector selects no pod of the set"));
                }
                targets = hits;
            }
            // Ingress ports are served by the governed pods; egress ports by the one local peer
            // (other namespaces, IP blocks and several peers are not checked).
            let checkable = what == "ingress" || (peers.len() == 1 && local_pods(&peers[0]).is_some());
            if what == "ingress" {
                targets = governed.clone();
            }
            for (k, port) in ports.iter().enumerate().filter(|_| checkable) {
                let Some(want) = &port.port else { continue };
                let proto = port.protocol.as_deref().unwrap_or("TCP");
                let hit = targets
                    .iter()
                    .flat_map(|w| served(w))
                    .any(|(name, n, pr)| pr == proto && port_allowed(std::slice::from_ref(port), n, name));
                if !hit {
                    r.at(
                        p.at,
                        format!("spec.{what}[{i}].ports[{k}]: port {want:?} is served by no container of the pods it leads to"),
                    );
                }
            }
        }
    }
}

/// Whether some policy governing `w` lets something in on container port `port`.
fn ingress_open(policies: &[Policy], w: &Workload, port: i32, name: Option<&str>) -> bool {
    let governing: Vec<&Policy> = policies.iter().filter(|p| p.ingress && p.governs(w)).collect();
    governing.is_empty()
        || governing.iter().any(|p| p.ingress_rules().iter().any(|(_, ports)| port_allowed(ports, port, name)))
}

/// A Service port whose pods accept nothing on it is dead under the default deny.
fn check_service_ports(objects: &[Object], workloads: &[Workload], policies: &[Policy], r: &mut Report) {
    for o in objects {
        let Kind::Service(s) = &o.kind else { continue };
        let Some(spec) = &s.spec else { continue };
        let selector = spec.selector.clone().unwrap_or_default();
        let pods = workloads
            .iter()
            .filter(|w| !selector.is_empty() && selector.iter().all(|(k, v)| w.labels.get(k) == Some(v)));
        for w in pods {
            for sp in spec.ports.iter().flatten() {
                let target = sp.target_port.clone().unwrap_or(IntOrString::Int(sp.port));
                let container = served(w).find(|(name, n, _)| match &target {
                    IntOrString::Int(t) => n == t,
                    IntOrString::String(t) => *name == Some(t.as_str()),
                });
                let Some((name, n, _)) = container else { continue }; // reported by the Service check
                if !ingress_open(policies, w, n, name) {
                    r.at(&o.at, format!("port {}: no NetworkPolicy lets anything into {} on port {n}", sp.port, w.at));
                }
            }
        }
    }
}

/// A connection a container makes to pods of the set: `what` for messages, the pods, the port.
struct Dial<'a> {
    what: String,
    to: Vec<&'a Workload<'a>>,
    port: IntOrString,
}

/// What the containers of `w` dial: the coordinator Service (`--coordinator` or
/// BERT2BERT_COORDINATOR) and, for ring workers, the ring port of their fellow replicas.
fn dials<'a>(objects: &[Object], workloads: &'a [Workload<'a>], w: &Workload) -> Vec<Dial<'a>> {
    let mut out = Vec::new();
    for c in &w.spec.containers {
        let args = command_of(c);
        let env = c.env.iter().flatten().find(|e| e.name == "BERT2BERT_COORDINATOR").and_then(|e| e.value.as_deref());
        if let Some(url) = flag(&args, "--coordinator").or(env) {
            let authority = url.split("://").last().unwrap_or(url).split('/').next().unwrap_or("");
            let (host, port) = authority.rsplit_once(':').unwrap_or((authority, ""));
            let port = port.parse::<i32>().unwrap_or(0);
            // `name`, `name.ns`, `name.ns.svc...` of a Service of the set; anything else is
            // outside the namespace and not governed here.
            let service = objects.iter().find_map(|o| match &o.kind {
                Kind::Service(s) => {
                    let ns = o.metadata().namespace.as_deref().unwrap_or("");
                    let (name, qualified) = (o.name(), format!("{}.{ns}", o.name()));
                    let hit = host == name || host == qualified || host.starts_with(&format!("{qualified}."));
                    hit.then_some(s.spec.as_ref()).flatten()
                }
                _ => None,
            });
            // A missing Service or port is reported by the rules.
            if let Some(spec) = service
                && let Some(sp) = spec.ports.iter().flatten().find(|p| p.port == port)
            {
                let selector = spec.selector.clone().unwrap_or_default();
                let to = workloads
                    .iter()
                    .filter(|d| !selector.is_empty() && selector.iter().all(|(k, v)| d.labels.get(k) == Some(v)))
                    .collect();
                let port = sp.target_port.clone().unwrap_or(IntOrString::Int(sp.port));
                out.push(Dial { what: format!("container `{}` dials {url}", c.name), to, port });
            }
        }
        let ring = flag(&args, "--ring-listen").and_then(|l| l.rsplit_once(':')).and_then(|(_, p)| p.parse().ok());
        if let Some(port) = ring.filter(|p| *p != 0 && w.replicas > 1) {
            let to = workloads.iter().filter(|d| d.at == w.at).collect();
            let what = format!("container `{}` dials its peers' ring", c.name);
            out.push(Dial { what, to, port: IntOrString::Int(port) });
        }
    }
    out
}

/// Every connection a container makes must be let out by its policies and in by the target's.
fn check_dials(objects: &[Object], workloads: &[Workload], policies: &[Policy], r: &mut Report) {
    for w in workloads {
        for d in dials(objects, workloads, w) {
            for dest in &d.to {
                let Some((name, n, _)) = served(dest).find(|(pn, n, _)| match &d.port {
                    IntOrString::Int(t) => n == t,
                    IntOrString::String(t) => *pn == Some(t.as_str()),
                }) else {
                    continue;
                };
                if !egress_allows(policies, w, dest, n, name) {
                    r.at(
                        w.at,
                        format!("{}, but no NetworkPolicy lets its egress reach {} on port {n}", d.what, dest.at),
                    );
                }
                if !ingress_allows(policies, w, dest, n, name) {
                    r.at(w.at, format!("{}, but no NetworkPolicy lets it into {} on port {n}", d.what, dest.at));
                }
            }
        }
    }
}

fn peer_is(peers: &[NetworkPolicyPeer], w: &Workload) -> bool {
    peers.is_empty() || peers.iter().any(|peer| local_pods(peer).is_some_and(|s| selects(s, &w.labels)))
}

fn egress_allows(policies: &[Policy], from: &Workload, to: &Workload, port: i32, name: Option<&str>) -> bool {
    let governing: Vec<&Policy> = policies.iter().filter(|p| p.egress && p.governs(from)).collect();
    governing.is_empty()
        || governing.iter().any(|p| {
            p.egress_rules().iter().any(|(peers, ports)| peer_is(peers, to) && port_allowed(ports, port, name))
        })
}

fn ingress_allows(policies: &[Policy], from: &Workload, to: &Workload, port: i32, name: Option<&str>) -> bool {
    let governing: Vec<&Policy> = policies.iter().filter(|p| p.ingress && p.governs(to)).collect();
    governing.is_empty()
        || governing.iter().any(|p| {
            p.ingress_rules().iter().any(|(peers, ports)| peer_is(peers, from) && port_allowed(ports, port, name))
        })
}
