#!/usr/bin/env bash
# `make bench`: release build, real local services, every benchmark side by
# side, report in docs/BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
services=deploy/local/services.sh

started=0
if ! bash "$services" status >/dev/null 2>&1; then
  bash "$services" up
  started=1
fi
trap '[ "$started" = 1 ] && bash "$services" down' EXIT

set -a
# shellcheck source=/dev/null
. "$(bash "$services" env)"
set +a

# A thousand concurrent conversations hold a thousand connections.
ulimit -n 65536 2>/dev/null || ulimit -n 4096 2>/dev/null || true

# shoal-worker and shoal-scheduler: the `idle` section starts them as processes.
cargo build --release -p shoal-tests --bin shoal-bench --bin shoal-llm-sim -p shoal-worker --bin shoal-sandbox-exec --bin shoal-worker -p shoal-scheduler --bin shoal-scheduler
./target/release/shoal-bench "$@"
cat docs/BENCHMARKS.md
