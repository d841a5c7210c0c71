#!/usr/bin/env bash
# `make demo`: a real agent task, end to end, on this machine.
#
# Starts RabbitMQ and Redis, an LLM, the scheduler and a worker; submits an
# agent task through the CLI; follows it live with `shoal watch`; ends with the
# outcome, the answer, steps, tokens, cost and time. Ctrl-C stops everything
# it started.
#
# The LLM: ANTHROPIC_API_KEY or OPENAI_API_KEY when set (that provider), else
# the embedded local model (llama.cpp on loopback; built and fetched once by
# deploy/local/llm.sh). SHOAL_DEMO_LLM_URL points the local profile at any
# other OpenAI-compatible server instead (the tests use the LLM simulator).
#
# `make fleet` (SHOAL_DEMO_TASK=0 SHOAL_DEMO_STAY=1) starts the same fleet,
# skips the demo task, and keeps it running for your own tasks until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
services=deploy/local/services.sh
port=${SHOAL_DEMO_PORT:-38080}
logs=.local/demo
bin=${SHOAL_BIN_DIR:-target/debug}
run_task=${SHOAL_DEMO_TASK:-1}
stay=${SHOAL_DEMO_STAY:-0}
prompt=${SHOAL_DEMO_PROMPT:-"Write fib.py that prints the first 20 Fibonacci numbers, one per line, run it, and report the output."}

say() { printf '\033[1m==> %s\033[0m\n' "$*"; }

started_services=0
started_llm=0
pids=()
cleanup() {
  set +e
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null; done
  if [ "$started_llm" = 1 ]; then bash deploy/local/llm.sh stop; fi
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
export SHOAL__NAMESPACE=${SHOAL__NAMESPACE:-demo}
export SHOAL__SCHEDULER__LISTEN="127.0.0.1:$port"
export SHOAL__WORKER__METRICS_LISTEN=${SHOAL__WORKER__METRICS_LISTEN:-127.0.0.1:9464}
# Ctrl-C should not wait a minute for the running conversation.
export SHOAL__WORKER__DRAIN_TIMEOUT_S=${SHOAL__WORKER__DRAIN_TIMEOUT_S:-5}
export SHOAL_SERVER="http://127.0.0.1:$port"
mkdir -p "$logs"

# Choose the LLM.
if [ -n "${SHOAL_DEMO_LLM_URL:-}" ]; then
  llm="the OpenAI-compatible server at $SHOAL_DEMO_LLM_URL"
  model=local
  export SHOAL__MODELS__LOCAL__PROVIDER=openai SHOAL__MODELS__LOCAL__MODEL=local
  export SHOAL__MODELS__LOCAL__BASE_URL=$SHOAL_DEMO_LLM_URL SHOAL__MODELS__LOCAL__FUNCTION_CALLING=constrained
elif [ -n "${ANTHROPIC_API_KEY:-}" ]; then
  llm="Anthropic (ANTHROPIC_API_KEY is set)"; model=anthropic
elif [ -n "${OPENAI_API_KEY:-}" ]; then
  llm="OpenAI (OPENAI_API_KEY is set)"; model=openai
else
  # Stopped at the end only when this run started it.
  if ! bash deploy/local/llm.sh status >/dev/null 2>&1; then
    say "starting the embedded local LLM (first run builds llama.cpp and fetches the model: several minutes, once)"
    bash deploy/local/llm.sh start
    started_llm=1
  fi
  llm="the embedded local model (llama.cpp, $(bash deploy/local/llm.sh url))"
  model=local
  export SHOAL__MODELS__LOCAL__PROVIDER=openai SHOAL__MODELS__LOCAL__MODEL=local
  export SHOAL__MODELS__LOCAL__BASE_URL="$(bash deploy/local/llm.sh url)" SHOAL__MODELS__LOCAL__FUNCTION_CALLING=constrained
  export SHOAL__MODELS__LOCAL__TIMEOUT_S=300
  # Greedy decoding: measured, the 1.5B model's first program is right far
  # more often at temperature 0 than at 0.2 (docs/demo-trials.md).
  export SHOAL__MODELS__LOCAL__TEMPERATURE=${SHOAL__MODELS__LOCAL__TEMPERATURE:-0}
  # A small model left to ramble writes thousands of tokens at ~15/s on 2 cores;
  # one tool call fits in a few hundred.
  export SHOAL__MODELS__LOCAL__MAX_TOKENS=${SHOAL__MODELS__LOCAL__MAX_TOKENS:-768}
fi
export SHOAL__AGENT__DEFAULT_MODEL=$model
say "LLM: $llm"

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

status=0
if [ "$run_task" = 1 ]; then
  say "submitting an agent task: $prompt"
  started=$(date +%s.%N)
  id=$("$bin/shoal" submit --timeout "${SHOAL_DEMO_TIMEOUT:-300}" "$prompt")
  say "task $id — following it live (shoal watch $id)"
  "$bin/shoal" watch "$id" || status=$?
  elapsed=$(awk -v s="$started" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')

  if [ "$status" = 0 ]; then
    say "the agent finished the task in ${elapsed}s"
  else
    say "the task did not succeed (${elapsed}s); the events above say why"
  fi
  cat <<EOT

What next:
  - metrics of the worker: http://127.0.0.1:${SHOAL__WORKER__METRICS_LISTEN##*:}/metrics (while it runs);
    RabbitMQ: ${SHOAL_RABBITMQ_MGMT_URL} (guest/guest)
  - your own tasks: \`make fleet\` starts this fleet and keeps it running (Ctrl-C stops it), then
      $root/$bin/shoal submit "your prompt"          # an agent task
      $root/$bin/shoal submit --exec 'uname -a' --wait
      $root/$bin/shoal watch <id>
  - every event of this task: XRANGE ${SHOAL__NAMESPACE}:task:{$id}:events - +
EOT
fi

if [ "$stay" = 1 ]; then
  cat <<EOT

The fleet is running: scheduler $SHOAL_SERVER, one worker, $llm.
In another terminal:
  export SHOAL_SERVER=$SHOAL_SERVER
  $root/$bin/shoal submit "your prompt"                  # an agent task; prints its id
  $root/$bin/shoal submit --exec 'uname -a' --wait       # a command in a sandbox
  $root/$bin/shoal watch <id>                            # follow a task live
Worker metrics: http://127.0.0.1:${SHOAL__WORKER__METRICS_LISTEN##*:}/metrics; logs in $logs/.
Ctrl-C here stops everything this started.
EOT
  # Returns when the scheduler or the worker exits; Ctrl-C runs the cleanup.
  wait -n "${pids[@]}" || true
  say "the scheduler or the worker stopped; see $logs/"
  exit 1
fi
exit "$status"
