#!/usr/bin/env bash
# Proves the Grafana dashboard and the Prometheus rules against the real things
# (docs/adr/0023-dashboard-and-alerts.md):
#
#   1. the committed dashboard is what deploy/grafana/build_dashboard.py builds;
#   2. `promtool check rules` and `promtool test rules` (unit tests of every alert);
#   3. a real run: the local RabbitMQ/Redis, a real shoal-scheduler, two real
#      shoal-worker processes (own ids and metrics ports), the LLM simulator as
#      the agents' model, and a real Prometheus (scrape_interval 1s) scraping the
#      scheduler, both workers and RabbitMQ's rabbitmq_prometheus plugin, with
#      the rules loaded. Waves of exec tasks (succeeding, exiting 3, timing out,
#      one whose lease another holder has when a worker first takes it: a
#      leased_elsewhere retry), agent tasks (two meet a 500 from the LLM first:
#      an LLM retry of class server) and a malformed message (dead-lettered) run
#      to their expected terminal states, until every series the panels read
#      has moved while Prometheus watched;
#   4. every panel target of the dashboard, with its template variables resolved
#      the way Grafana resolves them (the variables' own label_values queries,
#      run against the same Prometheus), is evaluated through /api/v1/query: an
#      error, an empty result or only NaN fails the test and names the panel. A
#      deliberately wrong expression must be reported as failing by the same
#      checker (so the check cannot pass vacuously), and every loaded rule must
#      evaluate without error.
#
# Needs: prometheus and promtool (Debian `prometheus`, installed by
# `bash deploy/local/services.sh install`), python3, redis-cli, bwrap, and the built
# binaries in ${SHOAL_BIN_DIR:-target/debug} (`cargo build --workspace --bins`).
# Leaves RabbitMQ/Redis running if they were already up; stops everything else
# it started, by pid, checks no sandbox outlived the workers, and deletes the
# run's queues, exchanges and Redis keys. About 30 s.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
bin=${SHOAL_BIN_DIR:-target/debug}
services=deploy/local/services.sh
dashboard=deploy/grafana/shoal.json
rules=deploy/prometheus/shoal-rules.yml
rules_test=deploy/prometheus/shoal-rules.test.yml

say() { printf '==> %s\n' "$*"; }
fail() {
  printf 'dashboard.sh: FAIL: %s\n' "$*" >&2
  exit 1
}

for tool in prometheus promtool python3 redis-cli; do
  command -v "$tool" >/dev/null 2>&1 ||
    fail "'$tool' is missing (prometheus/promtool: bash deploy/local/services.sh install)"
done
for b in shoal shoal-scheduler shoal-worker shoal-llm-sim; do
  [ -x "$bin/$b" ] || fail "missing $bin/$b: run 'cargo build --workspace --bins'"
done

say "the committed dashboard is the generator's output"
python3 deploy/grafana/build_dashboard.py --check "$dashboard" ||
  fail "$dashboard differs from deploy/grafana/build_dashboard.py's output (run it to regenerate)"

say "the Grafana provisioning files"
# Textual (no YAML parser is installed by the project's scripts): the keys
# Grafana's file provider and Prometheus data source need.
for pattern in '^apiVersion: 1$' '^providers:$' '^    type: file$' '^      path: /'; do
  grep -qE "$pattern" deploy/grafana/provisioning/dashboards/shoal.yaml ||
    fail "deploy/grafana/provisioning/dashboards/shoal.yaml lacks /$pattern/"
done
for pattern in '^apiVersion: 1$' '^datasources:$' '^    type: prometheus$' '^    url: ' '^    uid: '; do
  grep -qE "$pattern" deploy/grafana/provisioning/datasources/prometheus.yaml ||
    fail "deploy/grafana/provisioning/datasources/prometheus.yaml lacks /$pattern/"
done

say "promtool check rules"
promtool check rules "$rules"
say "promtool test rules"
promtool test rules "$rules_test"

# ---------------------------------------------------------------- the run
started_services=0
pids=()
work=
ns=
# This run's queues, exchanges and Redis keys: gone afterwards, so the shared
# broker does not collect a namespace per run.
forget_namespace() {
  python3 - "$ns" "$SHOAL_RABBITMQ_MGMT_URL" <<'PY' || echo "dashboard.sh: could not delete the run's queues" >&2
import base64, json, sys, urllib.parse, urllib.request
ns, mgmt = sys.argv[1], sys.argv[2]
auth = "Basic " + base64.b64encode(b"guest:guest").decode()
def call(method, path):
    req = urllib.request.Request(mgmt + path, method=method, headers={"authorization": auth})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read()
for kind in ("queues", "exchanges"):
    for item in json.loads(call("GET", f"/api/{kind}/%2F?columns=name")):
        if item["name"].startswith(ns + "."):
            call("DELETE", f"/api/{kind}/%2F/" + urllib.parse.quote(item["name"], safe=""))
PY
  redis-cli -u "$redis_url" --scan --pattern "$ns:*" | xargs -r -n 100 redis-cli -u "$redis_url" del >/dev/null ||
    echo "dashboard.sh: could not delete the run's Redis keys" >&2
}
cleanup() {
  local status=$?
  set +e
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for pid in "${pids[@]}"; do
    for _ in $(seq 1 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  done
  if [ "$status" != 0 ] && [ -n "$work" ]; then
    for log in "$work"/*.log; do
      echo "--- tail of $log" >&2
      tail -n 30 "$log" >&2
    done
  fi
  if [ -n "$work" ]; then rm -rf "$work"; fi
  if [ -n "$ns" ]; then forget_namespace; fi
  if [ "$started_services" = 1 ]; then bash "$services" down >/dev/null; fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if ! bash "$services" status >/dev/null 2>&1; then
  say "starting RabbitMQ and Redis"
  bash "$services" up
  started_services=1
fi
set -a
# shellcheck source=/dev/null
. "$(bash "$services" env)"
set +a
redis_url=$SHOAL__REDIS__URL
rabbit_prom=${SHOAL_RABBITMQ_PROM_URL#http://}
rabbit_prom=${rabbit_prom%%/*}

ns="obs-$(python3 -c 'import uuid; print(uuid.uuid4().hex[:10])')"
mkdir -p .local/observability
work=$(mktemp -d "$root/.local/observability/$ns.XXXXXX")
# The sandbox root must be ours alone and traversable by the sandboxes' uids.
chmod go+x "$root/.local" "$root/.local/observability"
chmod 711 "$work"
mkdir -m 711 "$work/sandboxes"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
api_port=$(free_port)
w1_port=$(free_port)
w2_port=$(free_port)
prom_port=$(free_port)
api="http://127.0.0.1:$api_port"
prom="http://127.0.0.1:$prom_port"

# http METHOD URL [JSON-BODY]: the body on stdout; fails on a non-2xx answer.
# (RabbitMQ's management API with the local guest account.)
http() {
  python3 - "$@" <<'PY'
import base64, sys, urllib.request
method, url = sys.argv[1], sys.argv[2]
body = sys.argv[3].encode() if len(sys.argv) > 3 else None
req = urllib.request.Request(url, data=body, method=method)
req.add_header("content-type", "application/json")
if "/api/" in url:
    req.add_header("authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
with urllib.request.urlopen(req, timeout=30) as resp:
    sys.stdout.write(resp.read().decode())
PY
}

# wait_for DESCRIPTION SECONDS COMMAND...: polls COMMAND until it succeeds.
wait_for() {
  local what=$1 limit=$2
  shift 2
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || fail "timed out after ${limit}s waiting for $what"
    sleep 0.2
  done
}

max_waves=${SHOAL_OBS_MAX_WAVES:-8}
say "LLM simulator"
# Constrained tool calls (as the local-model profile uses): every agent runs
# `echo observed` in the terminal, then finishes once it sees the output. A
# prompt with "flaky-<wave><copy>:" first meets a 500, which the worker retries (an LLM
# error class on the dashboard).
cat >"$work/llm-script.json" <<'EOF'
{
  "rules": [
    {"when": {"last_message_contains": "observed"},
     "then": {"kind": "reply", "usage": {"input": 1100, "output": 40},
              "text": "{\"thought\": \"Done.\", \"name\": \"finish\", \"arguments\": {\"message\": \"said it\"}}"}},
    @FLAKY@
    {"when": "always",
     "then": {"kind": "reply", "usage": {"input": 900, "output": 60, "cache_read": 100},
              "text": "{\"thought\": \"Run it.\", \"name\": \"terminal\", \"arguments\": {\"command\": \"echo observed\"}}"}}
  ]
}
EOF
# One 500 for each wave's flaky-<n><a|b>: tasks (a rule is used up after `times`).
flaky=$(for n in $(seq 1 "$max_waves"); do
  for copy in a b; do
    printf '{"when": {"last_user_contains": "flaky-%d%s:"}, "then": {"kind": "server_error"}, "times": 1},' "$n" "$copy"
  done
done)
sed -i "s/@FLAKY@/$flaky/" "$work/llm-script.json"
"$bin/shoal-llm-sim" --script "$work/llm-script.json" >"$work/llm-sim.log" 2>&1 &
pids+=($!)
llm_url() { sed -n 's/^ *OpenAI-compatible base_url: \([^ ]*\).*/\1/p' "$work/llm-sim.log" | grep .; }
wait_for "the LLM simulator's URL" 30 llm_url
sim_url=$(llm_url)

cat >"$work/shoal.toml" <<EOF
namespace = "$ns"
broker.url = "$SHOAL__BROKER__URL"
redis.url = "$SHOAL__REDIS__URL"
sandbox.root = "$work/sandboxes"
scheduler.listen = "127.0.0.1:$api_port"
worker.slots = 2
worker.idle_sweep_ms = 50
worker.drain_timeout_s = 2
agent.default_model = "sim"

[models.sim]
provider = "openai"
base_url = "$sim_url"
model = "sim"
function_calling = "constrained"
max_retries = 3
price_input = 3.0
price_output = 15.0
price_cache_read = 0.3
EOF
export SHOAL_CONFIG="$work/shoal.toml"
# Nothing from the caller's environment overrides this run's file.
while IFS='=' read -r name _; do
  case "$name" in SHOAL__*) unset "$name" ;; esac
done < <(env)
unset ANTHROPIC_API_KEY OPENAI_API_KEY

say "scheduler on $api, workers w1 (:$w1_port) and w2 (:$w2_port), namespace $ns"
"$bin/shoal-scheduler" >"$work/scheduler.log" 2>&1 &
pids+=($!)
SHOAL__WORKER__ID=obs-w1 SHOAL__WORKER__METRICS_LISTEN="127.0.0.1:$w1_port" \
  "$bin/shoal-worker" >"$work/worker1.log" 2>&1 &
pids+=($!)
workers=($!)
SHOAL__WORKER__ID=obs-w2 SHOAL__WORKER__METRICS_LISTEN="127.0.0.1:$w2_port" \
  "$bin/shoal-worker" >"$work/worker2.log" 2>&1 &
pids+=($!)
workers+=($!)
wait_for "the scheduler's /readyz" 60 http GET "$api/readyz"
wait_for "worker 1's /readyz" 60 http GET "http://127.0.0.1:$w1_port/readyz"
wait_for "worker 2's /readyz" 60 http GET "http://127.0.0.1:$w2_port/readyz"

say "Prometheus on $prom"
cat >"$work/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - $root/$rules
scrape_configs:
  - job_name: shoal-scheduler
    static_configs:
      - targets: ["127.0.0.1:$api_port"]
        labels:
          shoal_namespace: "$ns"
  - job_name: shoal-worker
    static_configs:
      - targets: ["127.0.0.1:$w1_port", "127.0.0.1:$w2_port"]
        labels:
          shoal_namespace: "$ns"
  - job_name: rabbitmq
    static_configs:
      - targets: ["$rabbit_prom"]
  - job_name: rabbitmq-queues
    metrics_path: /metrics/detailed
    params:
      family: [queue_coarse_metrics, queue_consumer_count]
    static_configs:
      - targets: ["$rabbit_prom"]
EOF
promtool check config "$work/prometheus.yml" >/dev/null
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/tsdb" \
  --web.listen-address="127.0.0.1:$prom_port" --log.level=warn >"$work/prometheus.log" 2>&1 &
pids+=($!)
wait_for "Prometheus /-/ready" 60 http GET "$prom/-/ready"

# ---------------------------------------------------------------- the tasks
# Prometheus' rate() sees a counter's increase only after it has scraped the
# series once, and which worker takes which task is up to them: the mix is
# submitted in waves, each after Prometheus has scraped the previous one, until
# every series the panels read has moved while being watched (at most
# $max_waves waves; usually two or three).
export SHOAL_SERVER=$api PROM=$prom NS=$ns
submit() { "$bin/shoal" submit "$@"; }
# (A task published past the scheduler has no record until a worker takes it.)
state_of() {
  http GET "$api/v1/tasks/$1" 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])' ||
    echo unknown
}
declare -A final expected
all_ids=()
wave=0
while :; do
  wave=$((wave + 1))
  ids=()
  ids+=("$(submit --exec 'echo ok')") && expected[${ids[-1]}]=succeeded
  ids+=("$(submit --exec 'echo high' --priority high)") && expected[${ids[-1]}]=succeeded
  # Two of each outcome that happens once per task, so that each wave most
  # likely gives every worker one (3 chances in 4 for a given worker).
  for copy in a b; do
    ids+=("$(submit --exec 'exit 3')") && expected[${ids[-1]}]=failed
    ids+=("$(submit --exec 'sleep 60' --timeout 2)") && expected[${ids[-1]}]=timed_out
    ids+=("$(submit --model sim "A flaky-$wave$copy: one: say hello with echo.")") && expected[${ids[-1]}]=succeeded
  done
  ids+=("$(submit --model sim 'Say hello with echo.')") && expected[${ids[-1]}]=succeeded
  all_ids+=("${ids[@]}")
  # A task whose lease another holder has (for 2.5 s) when a worker first takes
  # it: the worker sends it to the 5 s retry tier (retries by reason:
  # leased_elsewhere), and the retried copy succeeds. Published past the
  # scheduler, as a TaskMessage (shared/src/message.rs), so that its id is
  # known before any worker sees it.
  rid=$(python3 -c 'import uuid; print(uuid.uuid4())')
  redis-cli -u "$redis_url" SET "$ns:task:{$rid}:lease" "obs-elsewhere/1" PX 2500 | grep -qx OK ||
    fail "could not hold the lease of $rid"
  message=$(python3 -c '
import datetime, json, sys
print(json.dumps({"v": 1, "id": sys.argv[1], "tenant": "default",
                  "spec": {"kind": {"type": "exec", "command": "echo retried"}, "priority": "normal"},
                  "submitted_at": datetime.datetime.now(datetime.timezone.utc).isoformat()}))' "$rid")
  http POST "$SHOAL_RABBITMQ_MGMT_URL/api/exchanges/%2F/$ns.work/publish" \
    "$(python3 -c 'import json,sys; print(json.dumps({"properties": {"delivery_mode": 2, "content_type": "application/json"}, "routing_key": "normal.retry", "payload": sys.argv[1], "payload_encoding": "string"}))' "$message")" |
    grep -q '"routed":true' || fail "the task message $rid was not routed"
  ids+=("$rid") && expected[$rid]=succeeded
  all_ids+=("$rid")
  # A message that is not a task: a worker dead-letters it at once to $ns.dead.
  http POST "$SHOAL_RABBITMQ_MGMT_URL/api/exchanges/%2F/$ns.work/publish" \
    '{"properties":{},"routing_key":"normal.x","payload":"not a task","payload_encoding":"string"}' |
    grep -q '"routed":true' || fail "the malformed message was not routed"

  deadline=$((SECONDS + 90))
  while :; do
    pending=0
    for id in "${ids[@]}"; do
      [ -n "${final[$id]:-}" ] && continue
      state=$(state_of "$id")
      case "$state" in
        succeeded | failed | timed_out | cancelled | dead) final[$id]=$state ;;
        *) pending=$((pending + 1)) ;;
      esac
    done
    [ "$pending" = 0 ] && break
    [ $SECONDS -lt $deadline ] || fail "wave $wave: $pending tasks still not finished after 90s"
    sleep 0.3
  done
  for id in "${ids[@]}"; do
    [ "${final[$id]}" = "${expected[$id]}" ] && continue
    http GET "$api/v1/tasks/$id" >&2 || true
    echo >&2
    fail "wave $wave: task $id ended ${final[$id]}, expected ${expected[$id]}"
  done
  summary=$(for id in "${ids[@]}"; do echo "${final[$id]}"; done | sort | uniq -c | tr -s ' \n' ' ')
  say "wave $wave: ${#ids[@]} tasks ended as expected:$summary"

  TASKS=${#all_ids[@]} DEAD=$wave python3 tests/observability/check_panels.py wait-final ||
    fail "Prometheus never saw wave $wave's final values"
  if python3 tests/observability/check_panels.py traffic; then break; fi
  [ "$wave" -lt "$max_waves" ] || fail "after $wave waves some series the panels read never moved while scraped (above)"
done

# ---------------------------------------------------------------- the panels
python3 tests/observability/check_panels.py check "$dashboard"

say "stopping the workers: no sandbox process may outlive them"
for pid in "${workers[@]}"; do kill -TERM "$pid"; done
for pid in "${workers[@]}"; do
  status=0
  wait "$pid" || status=$?
  [ "$status" = 0 ] || fail "worker $pid exited with $status on SIGTERM"
done
left=$(python3 - "$work/sandboxes" <<'PY'
import os, sys
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        argv = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace").split("\0")
    except OSError:
        continue
    if int(pid) != os.getpid() and any(sys.argv[1] in a for a in argv):
        print(pid, " ".join(argv)[:200])
PY
)
[ -z "$left" ] || fail "sandbox processes outlived their workers: $left"
say "PASS"
