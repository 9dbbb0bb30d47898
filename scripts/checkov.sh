#!/usr/bin/env bash
# Checkov on deploy/k8s, the way docs/kubernetes.md (Checkov) records it: checkov's own two views
# of the directory, `checkov -d deploy/k8s` (the kubernetes framework on every file as written,
# the kustomize framework on the rendered kustomization), plus tools/toolbox.yaml as it is
# applied (with the kustomization's image, rendered next to the NetworkPolicies that govern it).
#
# Needs: checkov ($CHECKOV, default /tmp/checkov-venv/bin/checkov; make it with
#   python3 -m venv /tmp/checkov-venv && /tmp/checkov-venv/bin/pip install checkov
# outside the repository) and kubectl (its built-in kustomize renders; checkov's kustomize
# framework finds it by itself). Works on a copy in a temp dir with dummy token files, so the
# real secrets are never read. Nothing leaves the machine: no Prisma Cloud API, no update check.
#
# Prints the failed checks and the counts; exits 1 when more than MAX_FAILED (default 3) fail
# in all, 2 when a tool is missing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CHECKOV="${CHECKOV:-/tmp/checkov-venv/bin/checkov}"
MAX_FAILED="${MAX_FAILED:-3}"
[[ -x "$CHECKOV" ]] || { echo "checkov.sh: no checkov at $CHECKOV (see the header of this script)" >&2; exit 2; }
command -v kubectl >/dev/null || { echo "checkov.sh: kubectl is needed to render the kustomization" >&2; exit 2; }

work="$(mktemp -d /tmp/checkov.XXXXXX)"
trap 'rm -rf "$work"' EXIT
cp -r "$root/deploy/k8s" "$work/k8s"
# secretGenerator reads these; their contents do not matter to any check.
printf 'dummy\n' >"$work/k8s/secrets/client-token"
printf 'dummy\n' >"$work/k8s/secrets/worker-token"

# No network: skip Prisma Cloud's guideline/policy downloads and PyPI's version check.
export BC_SKIP_MAPPING=TRUE CKV_SKIP_PACKAGE_UPDATE_CHECK=true
run_checkov() {
  "$CHECKOV" --compact --quiet --skip-download "$@" 2>&1 | grep -E "scan results|^Passed checks|^Check:|FAILED for resource" || true
}

echo "== checkov -d deploy/k8s (kubernetes and kustomize frameworks)"
(cd "$work" && run_checkov -d k8s --framework kubernetes kustomize) | tee "$work/dir.txt"

echo "== tools/toolbox.yaml as applied (the kustomization's image; with the NetworkPolicies)"
mkdir "$work/applied"
kubectl kustomize "$work/k8s" >"$work/applied/kustomization.yaml.rendered"
image="$(sed -n 's/^ *image: //p' "$work/applied/kustomization.yaml.rendered" | head -n 1)"
sed "s|image: bert2bert@.*|image: $image|" "$work/k8s/tools/toolbox.yaml" >"$work/applied/toolbox.yaml"
# Only the NetworkPolicies go with it: every other object was counted above already.
awk 'BEGIN { RS = "\n---\n" } /\nkind: NetworkPolicy\n/ { printf "---\n%s\n", $0 }' \
  "$work/applied/kustomization.yaml.rendered" >"$work/applied/network.yaml"
rm "$work/applied/kustomization.yaml.rendered"
(cd "$work" && run_checkov -d applied --framework kubernetes) | tee "$work/applied.txt"

# The toolbox's findings also appear in the directory scan (the file as written): count each
# (check, resource) once.
failed="$(cat "$work/dir.txt" "$work/applied.txt" | grep -E "^Check:|FAILED for resource" |
  paste - - | sed 's/FAILED for resource: \(base:\)\{0,1\}/ /' | sort -u | wc -l)"
echo "== distinct failed checks: $failed (allowed: $MAX_FAILED)"
((failed <= MAX_FAILED))
