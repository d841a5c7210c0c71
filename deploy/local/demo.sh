#!/usr/bin/env bash
# `make demo`: RabbitMQ and Redis, a scheduler and a worker, one task submitted
# through the CLI and followed to its result. Ctrl-C stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
services=deploy/local/services.sh
port=${SHOAL_DEMO_PORT:-38080}
logs=.local/demo
bin=target/debug

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

started_services=0
pids=()
cleanup() {
  set +e
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null; done
  if [ "$started_services" = 1 ]; then
    say "stopping RabbitMQ and Redis"
    bash "$services" down >/dev/null
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

for binary in shoal shoal-scheduler shoal-worker; do
  [ -x "$bin/$binary" ] || { echo "missing $bin/$binary: run 'make build' (make demo does)"; exit 1; }
done

if ! bash "$services" status >/dev/null 2>&1; then
  say "starting RabbitMQ and Redis (project-local, in .local/)"
  bash "$services" up
  started_services=1
fi
set -a
# shellcheck source=/dev/null
. "$(bash "$services" env)"
set +a
export SHOAL__NAMESPACE=demo
export SHOAL__SCHEDULER__LISTEN="127.0.0.1:$port"
export SHOAL_SERVER="http://127.0.0.1:$port"
mkdir -p "$logs"

say "starting the scheduler on $SHOAL_SERVER and a worker (logs in $logs/)"
"$bin/shoal-scheduler" >"$logs/scheduler.log" 2>&1 &
pids+=($!)
"$bin/shoal-worker" >"$logs/worker.log" 2>&1 &
pids+=($!)

deadline=$((SECONDS + 60))
until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
  if [ $SECONDS -ge $deadline ]; then
    echo "the scheduler did not come up; see $logs/scheduler.log"; tail -n 20 "$logs/scheduler.log"; exit 1
  fi
  sleep 0.2
done

say "submitting an exec task: examples/fib.py in a bubblewrap sandbox"
started=$(date +%s.%N)
"$bin/shoal" submit --code examples/fib.py --language python --wait
elapsed=$(awk -v s="$started" -v e="$(date +%s.%N)" 'BEGIN { printf "%.2f", e - s }')

say "done in ${elapsed}s (submit -> result)"
cat <<EOT

What next:
  - submit your own task while the services run (make up):
      $root/$bin/shoal --server $SHOAL_SERVER submit --exec 'uname -a' --wait
  - many at once from a JSON-lines file:  shoal submit -f tasks.jsonl
  - RabbitMQ management UI: ${SHOAL_RABBITMQ_MGMT_URL} (guest/guest)
  - every step of a task is in Redis: XRANGE demo:task:{<id>}:events - +
  - the tests: make test
EOT
