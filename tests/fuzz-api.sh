#!/usr/bin/env bash
# API fuzzing (docs/adr/0030-openapi.md): schemathesis, pinned with hashes in
# tests/fuzz/requirements.txt and installed into .local/schemathesis-venv,
# runs against a real shoal-scheduler's /openapi.json and fails on any 5xx
# and on any answer that breaks the document (schema, status code, content
# type). Two runs: the open API, then the API under a token.
#
# Needs RabbitMQ and Redis up (`make up`, or inside `make test`); starts its
# own scheduler in its own namespace on a free port, and stops it and deletes
# the namespace's queues and keys when done. No worker runs: fuzzed specs
# stay queued and are deleted with the namespace.
#
#   FUZZ_API_EXAMPLES  examples per operation and phase (default 40)
#   FUZZ_API_SEED      hypothesis seed (default: random, printed by schemathesis)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
requirements=tests/fuzz/requirements.txt
venv=.local/schemathesis-venv
examples=${FUZZ_API_EXAMPLES:-40}

if [ -z "${SHOAL__REDIS__URL:-}" ] || [ -z "${SHOAL__BROKER__URL:-}" ]; then
  set -a
  # shellcheck source=/dev/null
  . "$(bash deploy/local/services.sh env)"
  set +a
fi

# Python's venv module (Debian ships it apart, as python3-venv).
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  echo "==> installing python3-venv (apt-get)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
fi
if ! cmp -s "$requirements" "$venv/requirements.txt" 2>/dev/null; then
  echo "==> installing schemathesis into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    --require-hashes --only-binary=:all: -r "$requirements"
  cp "$requirements" "$venv/requirements.txt"
fi

for binary in shoal-scheduler; do
  if [ ! -x "target/debug/$binary" ]; then
    cargo build -q -p shoal-scheduler --bin "$binary"
  fi
done

work=$(mktemp -d)
namespace="fuzzapi$$"
pid=
stop_scheduler() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  fi
  pid=
}
cleanup() {
  stop_scheduler
  # The namespace's keys and queues (RabbitMQ's management API, as services.sh sets it).
  redis-cli -u "$SHOAL__REDIS__URL" --scan --pattern "$namespace:*" 2>/dev/null |
    xargs -r redis-cli -u "$SHOAL__REDIS__URL" del >/dev/null 2>&1 || true
  if [ -n "${SHOAL_RABBITMQ_MGMT_URL:-}" ]; then
    for kind in queues exchanges; do
      curl -fsS -u guest:guest "$SHOAL_RABBITMQ_MGMT_URL/api/$kind/%2f?columns=name" 2>/dev/null |
        python3 -c 'import json,sys; [print(q["name"]) for q in json.load(sys.stdin) if q["name"].startswith(sys.argv[1] + ".")]' "$namespace" |
        while read -r name; do
          curl -fsS -u guest:guest -X DELETE "$SHOAL_RABBITMQ_MGMT_URL/api/$kind/%2f/$name" >/dev/null || true
        done
    done
  fi
  rm -rf "$work"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Starts the scheduler with `extra` config lines; sets $base.
start_scheduler() {
  local port
  port=$(free_port)
  base="http://127.0.0.1:$port"
  {
    echo "namespace = \"$namespace\""
    echo "scheduler.listen = \"127.0.0.1:$port\""
    printf '%s\n' "$@"
  } >"$work/scheduler.toml"
  RUST_LOG=warn "$root/target/debug/shoal-scheduler" --config "$work/scheduler.toml" \
    >>"$work/scheduler.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 300); do
    if curl -fsS "$base/readyz" >/dev/null 2>&1; then return 0; fi
    if ! kill -0 "$pid" 2>/dev/null; then break; fi
    sleep 0.1
  done
  echo "the scheduler did not get ready; its log:" >&2
  cat "$work/scheduler.log" >&2
  return 1
}

# One schemathesis run against $base; extra arguments are passed on.
fuzz() {
  local seed=()
  if [ -n "${FUZZ_API_SEED:-}" ]; then seed=(--seed "$FUZZ_API_SEED"); fi
  # From the scratch directory: hypothesis keeps a .hypothesis/ in the working directory.
  (cd "$work" && "$root/$venv/bin/schemathesis" run "$base/openapi.json" \
    --checks not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance,response_headers_conformance \
    --max-examples "$examples" \
    --phases examples,coverage,fuzzing,stateful \
    --request-timeout 10 \
    --workers 2 \
    --no-color \
    --generation-database none \
    "${seed[@]}" \
    "$@")
}

failed=0
echo "==> schemathesis: the open API"
start_scheduler
fuzz || failed=1
stop_scheduler

echo "==> schemathesis: the API under a token"
token="fuzz-$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
start_scheduler "scheduler.tokens = { \"$token\" = \"fuzzers\" }"
fuzz --header "Authorization: Bearer $token" || failed=1
stop_scheduler

if [ "$failed" != 0 ]; then
  echo "schemathesis found problems (above); the scheduler's log:" >&2
  tail -n 50 "$work/scheduler.log" >&2
  exit 1
fi
echo "schemathesis: no server errors, every answer matches the document"
