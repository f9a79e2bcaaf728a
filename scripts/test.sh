#!/usr/bin/env bash
# Runs every test that can run on this machine: unit tests, service tests against a throwaway
# Postgres, reconcile tests against the in-memory Kubernetes API, and the local-mode end-to-end
# suite (real processes, real Postgres, real HTTP). The kind suite skips unless a cluster is reachable.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v initdb >/dev/null 2>&1 && ! compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
  echo "PostgreSQL server binaries not found: install them with 'sudo apt-get install -y postgresql'" >&2
  exit 1
fi

# End-to-end tests start the binaries, so build them first, and the previous release's for the
# upgrade test (from the git history; cached, so normally this does nothing).
cargo build --workspace --bins --locked
./scripts/build-previous-release.sh >/dev/null

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
else
  cargo test --workspace --locked --no-fail-fast
fi
