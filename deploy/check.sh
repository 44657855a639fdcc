#!/usr/bin/env bash
# Validates the deployment offline (after a one-time install of pinned tools):
#   1. deploy/base/policy.yaml picks no profile (the DaemonSet runs --profile auto);
#   2. the base and every overlay render with kustomize (kubectl's, pinned);
#   3. the invariants policy reload depends on hold in every render;
#   4. every rendered object, and deploy/examples/*.yaml, validates against the
#      Kubernetes schemas of each version in K8S_VERSIONS, strictly (kubernetes-validate);
#   5. checkov passes on every render and on deploy/Dockerfile; each waived check is waived
#      beside the object with a justification.
# Installs what a fresh Debian machine lacks (as root), only when it is missing: quiet and
# a few seconds when everything is present. Exits non-zero on any failure.
#
#   bash deploy/check.sh
set -euo pipefail

deploy=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(dirname "$deploy")
venv="$root/.cache/deploy-venv"
out="$root/.cache/deploy-render"
requirements="$deploy/requirements.txt"
# The oldest Kubernetes minor still maintained upstream when this was written, and the
# newest kubernetes-validate knows.
K8S_VERSIONS=(1.30.0 1.37.0)
started=$SECONDS

say() { printf 'deploy/check.sh: %s\n' "$*" >&2; }
fail() { say "FAILED: $*"; exit 1; }

# --- Debian packages: python3 with venv and ensurepip ------------------------------------
need_debs=()
command -v python3 >/dev/null || need_debs+=(python3)
if command -v python3 >/dev/null && ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    dpkg-query -W -f='${Status}' python3-venv 2>/dev/null | grep -q 'install ok installed' \
        || need_debs+=(python3-venv)
fi
if ((${#need_debs[@]})); then
    cmd="apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${need_debs[*]}"
    [[ $(id -u) == 0 ]] || fail "missing Debian packages; run as root: $cmd"
    say "installing Debian packages: ${need_debs[*]}"
    sh -c "$cmd" >/dev/null
fi

# --- Pinned Python tools in a venv, reinstalled only when requirements.txt changes -------
stamp="$venv/.requirements.sha256"
want=$(sha256sum "$requirements" | cut -d' ' -f1)
if [[ ! -x $venv/bin/python || ! -f $stamp || $(<"$stamp") != "$want" ]]; then
    say "installing pinned checkov, kubernetes-validate and kubectl into $venv"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-input -r "$requirements"
    echo "$want" >"$stamp"
fi
export PATH="$venv/bin:$PATH"

# --- 1. The ConfigMap's policy is layered on the detected profile: it must not pick one ---
# (That it parses on every profile is a unit test: policy::tests.)
if grep -Eq '^extends:' "$deploy/base/policy.yaml"; then
    fail "deploy/base/policy.yaml says extends:, which --profile auto refuses"
fi
grep -q -- '- auto' "$deploy/base/daemonset.yaml" \
    || fail "the DaemonSet no longer runs --profile auto: update deploy/README.md and this check"

# --- 2. Render the base and every overlay -------------------------------------------------
rm -rf "$out"
mkdir -p "$out"
rendered=()
for dir in "$deploy/base" "$deploy"/overlays/*/; do
    dir=${dir%/}
    name=$(basename "$dir")
    [[ $dir == "$deploy/base" ]] || name="overlay-$name"
    kubectl kustomize "$dir" >"$out/$name.yaml" || fail "kustomize ${dir#"$root"/}"
    rendered+=("$out/$name.yaml")
done

# --- 3. Invariants: the policy ConfigMap keeps a fixed name and is mounted as a directory
#        (else updates never reach the daemon); every checkov waiver carries a reason -----
python3 - "$deploy/Dockerfile" "$deploy/base/daemonset.yaml" "${rendered[@]}" <<'PY' || fail "invariants"
import re, sys, yaml
bad = []
source = yaml.safe_load(open(sys.argv[2]))["spec"]["template"]["spec"]
fixed_names = {v["configMap"]["name"] for v in source.get("volumes", []) if "configMap" in v}
# checkov splits an annotation's value on "=": exactly one, then the justification.
waiver = re.compile(r"^CKV2?_[A-Z0-9]+_[0-9]+=[^=]{20,}$")
for line in open(sys.argv[1]):
    if "checkov:skip=" in line and not re.search(r"checkov:skip=CKV2?_[A-Z0-9]+_[0-9]+:.{20,}", line):
        bad.append(f"{sys.argv[1]}: waiver without a justification: {line.strip()}")
for path in sys.argv[3:]:
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    for d in docs:
        for key, value in (d["metadata"].get("annotations") or {}).items():
            if key.startswith("checkov.io/skip") and not waiver.match(value):
                bad.append(f"{path}: {d['kind']}/{d['metadata']['name']}: {key} needs CHECK_ID=justification, one '=': {value}")
    configmaps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    for d in docs:
        if d["kind"] != "DaemonSet":
            continue
        spec = d["spec"]["template"]["spec"]
        cm_volumes = {v["name"]: v["configMap"]["name"] for v in spec.get("volumes", []) if "configMap" in v}
        for vol, cm in cm_volumes.items():
            if cm not in configmaps or cm not in fixed_names:
                bad.append(f"{path}: volume {vol} mounts ConfigMap {cm}, not one of {sorted(fixed_names)} "
                           "in the render: a hash suffix would roll the DaemonSet on every policy edit")
        for c in spec["containers"]:
            for m in c.get("volumeMounts", []):
                if m["name"] in cm_volumes and "subPath" in m:
                    bad.append(f"{path}: {c['name']} mounts {m['name']} with subPath: updates would never reach it")
            args = c.get("args", [])
            if "--policy" in args:
                policy = args[args.index("--policy") + 1]
                if not any(policy.startswith(m["mountPath"].rstrip("/") + "/")
                           for m in c.get("volumeMounts", []) if m["name"] in cm_volumes):
                    bad.append(f"{path}: --policy {policy} is not under a ConfigMap mount")
for b in bad:
    print(b, file=sys.stderr)
sys.exit(1 if bad else 0)
PY

# --- 4. Schemas -----------------------------------------------------------------------------
examples=("$deploy"/examples/*.yaml)
for version in "${K8S_VERSIONS[@]}"; do
    kubernetes-validate --strict --quiet -k "$version" "${rendered[@]}" "${examples[@]}" \
        || fail "kubernetes-validate against Kubernetes $version"
done

# --- 5. checkov -----------------------------------------------------------------------------
checkov_args=()
for f in "${rendered[@]}" "${examples[@]}"; do checkov_args+=(-f "$f"); done
checkov --quiet --compact --skip-download --framework kubernetes dockerfile \
    "${checkov_args[@]}" -f "$deploy/Dockerfile" >"$out/checkov.txt" 2>&1 || {
    cat "$out/checkov.txt" >&2
    fail "checkov"
}

say "ok: ${#rendered[@]} renders, ${K8S_VERSIONS[*]} schemas, checkov clean ($((SECONDS - started)) s)"
