#!/usr/bin/env bash
# The kind end-to-end suite: creates a kind cluster from kind-config.yaml, builds the three images and
# loads them into it, installs the operator with the chart, applies examples/students.yaml, waits for
# Ready, then runs the Rust kind tests (tests/tests/kind.rs) against it. On failure it dumps the
# pods, events, logs and the ShardedDatabase.
#
# Needs docker, kind, kubectl and cargo; helm is fetched into tools/bin when missing. Runs in GitHub
# Actions (.github/workflows/ci.yml, job "kind").
#   tests/kind/run.sh              create the cluster (reused if it exists), run, leave it running
#   KIND_KEEP=0 tests/kind/run.sh  delete the cluster at the end
#   KIND_CREATE=0 ...              use the current kubectl context instead of creating a cluster
set -euo pipefail
cd "$(dirname "$0")/../.."

CLUSTER=${KIND_CLUSTER:-sharddb}
NAMESPACE=${SHARDDB_NAMESPACE:-sharddb-system}
DB_NAMESPACE=${SHARDDB_DB_NAMESPACE:-default}
KIND_CREATE=${KIND_CREATE:-1}
KIND_KEEP=${KIND_KEEP:-1}
WAIT=${SHARDDB_WAIT:-10m}

log() { echo "kind-suite: $*" >&2; }

# The default images, read from the one place the operator pins them, so the images built here are
# the ones the operator asks for (also when it does not read the chart's image variables).
pinned() { sed -n "s/^pub const $1: &str = \"\(.*\)\";$/\1/p" operator/src/crd.rs; }
SHARD_SERVER_IMAGE=$(pinned DEFAULT_SHARD_SERVER_IMAGE)
ROUTER_IMAGE=$(pinned DEFAULT_ROUTER_IMAGE)
POSTGRES_IMAGE=$(pinned DEFAULT_POSTGRES_IMAGE)
TAG=${SHARD_SERVER_IMAGE##*:}
REGISTRY=${SHARD_SERVER_IMAGE%/*}
OPERATOR_IMAGE="$REGISTRY/sharddb-operator:$TAG"
[[ -n $SHARD_SERVER_IMAGE && -n $ROUTER_IMAGE && -n $POSTGRES_IMAGE ]] \
  || { log "cannot read the default images from operator/src/crd.rs"; exit 1; }

for tool in docker kind kubectl cargo; do
  command -v "$tool" >/dev/null 2>&1 || { log "'$tool' is required"; exit 1; }
done
./scripts/fetch-tools.sh >/dev/null
HELM=tools/bin/helm

dump() {
  log "FAILED: diagnostics follow"
  set +e
  kubectl get nodes -o wide
  kubectl get sdb -A -o yaml
  kubectl get all,configmaps,pvc,pdb,leases -A -o wide
  kubectl get events -A --sort-by=.lastTimestamp
  kubectl -n "$NAMESPACE" logs deployment/sharddb-operator --all-containers --tail=500
  for pod in $(kubectl -n "$DB_NAMESPACE" get pods -l app.kubernetes.io/name=sharddb -o name); do
    echo "----- $pod"
    kubectl -n "$DB_NAMESPACE" describe "$pod"
    kubectl -n "$DB_NAMESPACE" logs "$pod" --all-containers --tail=300
    kubectl -n "$DB_NAMESPACE" logs "$pod" --all-containers --previous --tail=100 2>/dev/null
  done
}
cleanup() {
  local rc=$?
  [[ $rc -ne 0 ]] && dump
  if [[ $KIND_KEEP == 0 && $KIND_CREATE == 1 ]]; then kind delete cluster --name "$CLUSTER"; fi
  exit "$rc"
}
trap cleanup EXIT

# 1. The cluster.
if [[ $KIND_CREATE == 1 ]]; then
  if kind get clusters | grep -qx "$CLUSTER"; then
    log "reusing kind cluster $CLUSTER"
  else
    log "creating kind cluster $CLUSTER"
    kind create cluster --name "$CLUSTER" --config kind-config.yaml --wait 5m
  fi
  kubectl config use-context "kind-$CLUSTER"
fi

# 2. The images: one Dockerfile, three targets sharing the builder stage.
export DOCKER_BUILDKIT=1
for target in operator router shard-server; do
  image="$REGISTRY/sharddb-$target:$TAG"
  log "building $image"
  docker build --target "$target" -t "$image" .
done
docker pull -q "$POSTGRES_IMAGE"
if [[ $KIND_CREATE == 1 ]]; then
  for image in "$OPERATOR_IMAGE" "$SHARD_SERVER_IMAGE" "$ROUTER_IMAGE" "$POSTGRES_IMAGE"; do
    log "loading $image"
    kind load docker-image --name "$CLUSTER" "$image"
  done
fi

# 3. The operator.
log "installing the chart into $NAMESPACE"
"$HELM" upgrade --install sharddb-operator charts/sharddb-operator --namespace "$NAMESPACE" --create-namespace \
  --set images.registry="$REGISTRY" --set images.tag="$TAG" --set images.postgres="$POSTGRES_IMAGE" \
  --set images.pullPolicy=IfNotPresent --wait --timeout 5m
kubectl wait --for=condition=Established crd/shardeddatabases.sharddb.io --timeout=60s

# 4. The example database.
log "applying examples/students.yaml and waiting for Ready (up to $WAIT)"
kubectl -n "$DB_NAMESPACE" apply -f examples/students.yaml
kubectl -n "$DB_NAMESPACE" wait --for=condition=Ready sdb/students --timeout="$WAIT"
kubectl -n "$DB_NAMESPACE" get sdb -o wide

# 5-8. The Rust tests: they run in order against the one database (their own order is fixed inside).
log "running tests/tests/kind.rs"
SHARDDB_KIND=1 SHARDDB_KIND_NAMESPACE="$DB_NAMESPACE" \
  cargo test -p tests --locked --test kind -- --nocapture --test-threads=1
log "passed"
