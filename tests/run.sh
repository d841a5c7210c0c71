#!/usr/bin/env bash
# Runs every test suite against real RabbitMQ and Redis.
#
# Starts the services unless they are already up (then leaves them running),
# builds the binaries the process-level tests spawn, runs the suites, and stops
# what it started. Beside the Rust suites: the Helm chart and Dockerfiles
# (tests/deploy/) and the dashboard and alert rules against a real Prometheus
# (tests/observability/). The chaos suite restarts the broker, so it runs
# alone after the others.
set -euo pipefail
cd "$(dirname "$0")/.."
services=deploy/local/services.sh

started=0
if ! bash "$services" status >/dev/null 2>&1; then
  bash "$services" up
  started=1
fi
stop() {
  if [ "$started" = 1 ]; then bash "$services" down || true; fi
}
trap stop EXIT

set -a
# shellcheck source=/dev/null
. "$(bash "$services" env)"
set +a

cargo build --workspace --bins --tests

# Every suite runs even when one before it failed; the run fails at the end,
# naming each suite that failed.
failed=()
suite() {
  local name=$1
  shift
  echo "==> $name"
  if ! "$@"; then
    failed+=("$name")
  fi
}

if command -v cargo-nextest >/dev/null 2>&1; then
  suite "rust tests" cargo nextest run --workspace --no-fail-fast -E 'not binary(chaos)'
else
  # cargo test runs test binaries one after another, so chaos runs alone.
  suite "rust tests" cargo test --workspace --no-fail-fast
fi
# Schemathesis against a real scheduler's /openapi.json (open, then under a
# token): no 5xx, every answer matches the document (ADR 0030).
suite "api fuzzing" bash tests/fuzz-api.sh
# The deployment: the Helm chart (lint, render, Kubernetes and CRD schemas,
# its ConfigMap loaded by the real binaries) and the Dockerfiles (hadolint).
suite "helm chart" bash tests/deploy/chart.sh
suite "dockerfiles" bash tests/deploy/dockerfile.sh
# A real Prometheus scraping a real scheduler, two workers and RabbitMQ:
# every dashboard panel returns data; the alert rules' unit tests.
suite "dashboard and alerts" bash tests/observability/dashboard.sh
# The chaos suite restarts the broker, so it runs alone, last.
if command -v cargo-nextest >/dev/null 2>&1; then
  suite "chaos" cargo nextest run -p shoal-tests --no-fail-fast -E 'binary(chaos)'
fi

if [ "${#failed[@]}" -gt 0 ]; then
  printf 'FAILED: %s\n' "${failed[@]}" >&2
  exit 1
fi
echo "all suites passed"
