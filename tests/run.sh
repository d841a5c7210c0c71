#!/usr/bin/env bash
# Runs every test suite against real RabbitMQ and Redis.
#
# Starts the services unless they are already up (then leaves them running),
# builds the binaries the process-level tests spawn, runs the suites, and stops
# what it started. The chaos suite restarts the broker, so it runs alone after
# the others.
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

if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast -E 'not binary(chaos)'
  cargo nextest run -p shoal-tests --no-fail-fast -E 'binary(chaos)'
else
  # cargo test runs test binaries one after another, so chaos runs alone.
  cargo test --workspace --no-fail-fast
fi
