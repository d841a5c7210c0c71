#!/usr/bin/env bash
# shellcheck disable=SC2001 # sed indents multi-line tool output
# Validates the Helm chart deploy/helm/shoal offline, with real tools:
#
#   for each value set (defaults, external services, KEDA off, Daytona-only,
#   bundled services):
#     1. helm lint --strict
#     2. helm template (--kube-version 1.30.0, KEDA and Prometheus Operator
#        API versions present)
#     3. every built-in object against the Kubernetes schemas of a current
#        version with kubernetes-validate --strict; the custom resources
#        (ScaledObject, TriggerAuthentication, PodMonitor) against their CRD
#        schemas (@kubernetes-models); an object nothing validates is a failure
#     4. the wiring: the KEDA trigger selects exactly the namespace's three
#        work queues with target worker.slots (or, KEDA off, an HPA targets
#        the workers); the worker pod's grace period exceeds
#        worker.drain_timeout_s, its probes follow worker.metrics_listen
#     5. the rendered ConfigMap's shoal.toml loaded by the real
#        shoal-scheduler and shoal-worker (--check-config), with the
#        environment the chart gives each Deployment's container (secret
#        values replaced by dummies of the right shape)
#     6. monitoring (where enabled): the dashboard ConfigMap holds exactly
#        deploy/grafana/shoal.json and is under 900 KiB (the API server refuses
#        a ConfigMap over 1 MiB); the PrometheusRule holds exactly the groups
#        of deploy/prometheus/shoal-rules.yml (and passes the Prometheus
#        Operator's CRD schema, step 3); the PodMonitors give the workers a
#        job label the rules and the dashboard select and scrape RabbitMQ's
#        /metrics/detailed with the per-queue families
#   the chart's copies (files/) of the dashboard and the rules are
#   byte-identical to deploy/grafana/shoal.json and deploy/prometheus/shoal-rules.yml
#   (deploy/helm/sync-files.sh refreshes them), and the PodMonitors' default
#   job names and scrape parameters are those of tests/observability/dashboard.sh;
#   then negative checks that prove each validator can fail.
#
# Tools are installed, pinned and checksum-checked, by
# deploy/tools/chart-tools.sh. Binaries: target/debug, built (incrementally)
# first, or $SHOAL_BIN_DIR as given.
# Exits non-zero on any failure, naming it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CHART="$ROOT/deploy/helm/shoal"
KUBE_VERSION="1.30.0"
VALIDATE_AGAINST="1.37.0" # kubernetes-validate: the newest Kubernetes release it knows
API_VERSIONS=(--api-versions keda.sh/v1alpha1 --api-versions monitoring.coreos.com/v1)
BIN="${SHOAL_BIN_DIR:-$ROOT/target/debug}"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

FAILURES=0
CHECKS=0
pass() { CHECKS=$((CHECKS + 1)); printf '  ok    %s\n' "$*"; }
fail() { CHECKS=$((CHECKS + 1)); FAILURES=$((FAILURES + 1)); printf '  FAIL  %s\n' "$*" >&2; }
die() { printf 'chart.sh: ERROR: %s\n' "$*" >&2; exit 1; }

# ---- tools -------------------------------------------------------------------
bash "$ROOT/deploy/tools/chart-tools.sh" install
eval "$(bash "$ROOT/deploy/tools/chart-tools.sh" env)"
command -v helm >/dev/null || die "helm not found after chart-tools.sh install"
[[ -x "$SHOAL_KV" ]] || die "kubernetes-validate not found at $SHOAL_KV"
[[ -f "$SHOAL_CRDS_DIR/validate-crds.mjs" ]] || die "CRD validator missing in $SHOAL_CRDS_DIR"
PY="$SHOAL_TOOLS_PYTHON" # has PyYAML (a kubernetes-validate dependency)

# The loaders must be the tree's own: a stale binary would judge the chart by
# an older set of keys. (SHOAL_BIN_DIR: binaries built elsewhere, used as is.)
if [[ -z "${SHOAL_BIN_DIR:-}" ]]; then
  echo "chart.sh: cargo build -p shoal-scheduler -p shoal-worker --bins"
  (cd "$ROOT" && cargo build --quiet -p shoal-scheduler -p shoal-worker --bins) \
    || die "building shoal-scheduler and shoal-worker failed"
fi
for bin in shoal-scheduler shoal-worker; do
  "$BIN/$bin" --help | grep -q -- '--check-config' \
    || die "$BIN/$bin has no --check-config flag: the ConfigMap cannot be checked against the real loader (build the current tree)"
done

# ---- helpers -----------------------------------------------------------------

# The chart's appVersion follows the Cargo workspace version.
workspace_version="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$ROOT/Cargo.toml")"
app_version="$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' "$CHART/Chart.yaml")"

# split RENDERED OUTDIR: one JSON array of all objects (objects.json), the
# TOML of the ConfigMap (shoal.toml), and per Deployment container an env
# file (env.<deployment>) of NAME=VALUE lines as the pod would get them,
# secrets as dummies of the right shape.
split_render() {
  "$PY" - "$1" "$2" <<'PY'
import json, sys, yaml
rendered, out = sys.argv[1], sys.argv[2]
objects = [d for d in yaml.safe_load_all(open(rendered)) if d]
json.dump(objects, open(f"{out}/objects.json", "w"))
dummies = {
    "SHOAL__BROKER__URL": "amqp://shoal:dummy@rabbitmq.invalid:5672/%2f",
    "SHOAL__REDIS__URL": "redis://:dummy@redis.invalid:6379/",
}
configs = 0
for o in objects:
    if o["kind"] == "ConfigMap" and "shoal.toml" in o.get("data", {}):
        open(f"{out}/shoal.toml", "w").write(o["data"]["shoal.toml"])
        configs += 1
    if o["kind"] == "Deployment":
        for c in o["spec"]["template"]["spec"]["containers"]:
            lines = []
            for e in c.get("env", []):
                if "value" in e:
                    value = e["value"]
                elif "secretKeyRef" in e.get("valueFrom", {}):
                    value = dummies.get(e["name"], "dummy-secret-value")
                elif "fieldRef" in e.get("valueFrom", {}):
                    value = "dummy-" + e["valueFrom"]["fieldRef"]["fieldPath"].replace(".", "-")
                else:
                    sys.exit(f"env {e['name']}: unsupported source {e}")
                if "\n" in value:
                    sys.exit(f"env {e['name']}: multi-line value")
                lines.append(f"{e['name']}={value}")
            comp = o["metadata"]["labels"]["app.kubernetes.io/component"]
            open(f"{out}/env.{comp}", "w").write("\n".join(lines) + "\n")
            open(f"{out}/cmd.{comp}", "w").write(c["command"][0] + "\n")
if configs != 1:
    sys.exit(f"expected one ConfigMap with shoal.toml, found {configs}")
PY
}

# kv FILE: kubernetes-validate --strict; every built-in object must pass, and
# the only objects it cannot check must be custom resources (checked next).
kv() {
  local file="$1" log="$1.kv"
  if ! "$SHOAL_KV" --strict -k "$VALIDATE_AGAINST" "$file" >"$log" 2>&1; then
    sed 's/^/        /' "$log" >&2
    return 1
  fi
  if grep -v -E "^INFO .* passed for resource |^WARN .* Couldn't find schema for kind (ScaledObject|TriggerAuthentication|PodMonitor|ServiceMonitor|PrometheusRule) with api version (keda.sh/v1alpha1|monitoring.coreos.com/v1) " "$log" | grep -q .; then
    echo "        unexpected kubernetes-validate output:" >&2
    grep -v -E "^INFO .* passed for resource " "$log" | sed 's/^/        /' >&2
    return 1
  fi
  grep -c "passed for resource" "$log"
}

crds() { # JSON...
  (cd "$SHOAL_CRDS_DIR" && node validate-crds.mjs "$@")
}

# check_config DIR COMPONENT: the component's binary loads DIR/shoal.toml
# with the env its container gets.
check_config() {
  local dir="$1" comp="$2" bin env_args=()
  bin="$(cat "$dir/cmd.$comp")"
  mapfile -t env_args <"$dir/env.$comp"
  env -i PATH="$PATH" HOME="$WORK" "${env_args[@]}" SHOAL_CONFIG="$dir/shoal.toml" \
    "$BIN/$bin" --check-config --config "$dir/shoal.toml"
}

# same_copy SOURCE COPY: the chart's copy of a file is byte-identical.
same_copy() {
  if cmp -s "$1" "$2"; then
    echo "${2#"$ROOT/"} = ${1#"$ROOT/"} ($(wc -c <"$1") bytes)"
  else
    echo "${2#"$ROOT/"} differs from ${1#"$ROOT/"}: run bash deploy/helm/sync-files.sh"
    return 1
  fi
}

# configmap_sizes JSON: every ConfigMap fits the API server's 1 MiB limit,
# with room to spare (900 KiB, counted on data + binaryData and on the whole
# object as JSON).
configmap_sizes() {
  "$PY" - "$1" <<'PY'
import json, sys
LIMIT = 900 * 1024
out, bad = [], []
for o in json.load(open(sys.argv[1])):
    if o["kind"] != "ConfigMap":
        continue
    name = o["metadata"]["name"]
    data = sum(len(k.encode()) + len(v.encode()) for k, v in (o.get("data") or {}).items())
    data += sum(len(k.encode()) + len(v) * 3 // 4 for k, v in (o.get("binaryData") or {}).items())
    whole = len(json.dumps(o, separators=(",", ":")).encode())
    (bad if max(data, whole) > LIMIT else out).append(f"{name} {max(data, whole) / 1024:.1f} KiB")
if bad:
    sys.exit(f"ConfigMap over {LIMIT // 1024} KiB (the API server refuses 1 MiB): {', '.join(bad)}")
print(", ".join(out) + f" (limit {LIMIT // 1024} KiB)")
PY
}

# monitoring_wiring JSON TOML: the dashboard ConfigMap and the PrometheusRule
# hold the project's files exactly; the PodMonitors' job labels fit the
# rules' and the dashboard's job selectors; the bundled RabbitMQ's per-queue
# endpoint is scraped. Prints "dashboard" / "rules" markers for the summary.
monitoring_wiring() {
  "$PY" - "$1" "$2" "$ROOT/deploy/grafana/shoal.json" "$ROOT/deploy/prometheus/shoal-rules.yml" <<'PY'
import json, re, sys, tomllib, yaml
objects = json.load(open(sys.argv[1]))
ns = tomllib.load(open(sys.argv[2], "rb")).get("namespace", "shoal")
dashboard_text = open(sys.argv[3]).read()
dashboard = json.loads(dashboard_text)
rules_text = open(sys.argv[4]).read()
rules = yaml.safe_load(rules_text)
said, errors = [], []

cms = [o for o in objects if o["kind"] == "ConfigMap" and "shoal.json" in o.get("data", {})]
for cm in cms:
    if cm["data"]["shoal.json"] != dashboard_text:
        errors.append(f"ConfigMap {cm['metadata']['name']}: shoal.json is not deploy/grafana/shoal.json")
    labels = cm["metadata"].get("labels", {})
    if "grafana_dashboard" not in labels:
        errors.append(f"ConfigMap {cm['metadata']['name']}: no grafana_dashboard label for the sidecar ({labels})")
    said.append(f"dashboard ConfigMap = deploy/grafana/shoal.json, grafana_dashboard={labels.get('grafana_dashboard')!r}")

prs = [o for o in objects if o["kind"] == "PrometheusRule"]
for pr in prs:
    if pr["spec"]["groups"] != rules["groups"]:
        errors.append(f"PrometheusRule {pr['metadata']['name']}: spec.groups differ from deploy/prometheus/shoal-rules.yml")
    n = sum(len(g["rules"]) for g in pr["spec"]["groups"])
    said.append(f"PrometheusRule = shoal-rules.yml ({n} rules)")

# The selectors the workers' job label must satisfy (PromQL regexes are anchored).
exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
selectors = {s for e in exprs for s in re.findall(r'job=~"([^"\\]+)"', e)}
worker_sel = [s for s in selectors if "worker" in s]
dash_sel = [v["query"] for v in dashboard["templating"]["list"] if v["name"] == "worker_job"]
if not worker_sel or not dash_sel:
    errors.append(f"no worker job selector found in the rules ({selectors}) or the dashboard ({dash_sel})")
sched_sel = [s for s in selectors if "scheduler" in s]
dash_sched_sel = [v["query"] for v in dashboard["templating"]["list"] if v["name"] == "scheduler_job"]
if not sched_sel or not dash_sched_sel:
    errors.append(f"no scheduler job selector found in the rules ({selectors}) or the dashboard ({dash_sched_sel})")

def relabel(endpoint, label):
    vals = [r.get("replacement") for r in endpoint.get("relabelings", []) if r.get("targetLabel") == label]
    return vals[-1] if vals else None

for pm in (o for o in objects if o["kind"] == "PodMonitor"):
    name, comp = pm["metadata"]["name"], pm["metadata"]["labels"]["app.kubernetes.io/component"]
    eps = pm["spec"]["podMetricsEndpoints"]
    if comp == "worker":
        job = relabel(eps[0], "job")
        missed = [s for s in worker_sel + dash_sel if not re.fullmatch(s, job or "")]
        if missed:
            errors.append(f"PodMonitor {name}: job {job!r} not selected by {missed}")
        if relabel(eps[0], "shoal_namespace") != ns:
            errors.append(f"PodMonitor {name}: shoal_namespace is not {ns!r}")
        said.append(f"worker job {job!r} matches {sorted(set(worker_sel + dash_sel))}, shoal_namespace={ns!r}")
    elif comp == "scheduler":
        job = relabel(eps[0], "job")
        missed = [s for s in sched_sel + dash_sched_sel if not re.fullmatch(s, job or "")]
        if missed:
            errors.append(f"PodMonitor {name}: job {job!r} not selected by {missed}")
        if eps[0].get("path") != "/metrics" or eps[0].get("port") != "http":
            errors.append(f"PodMonitor {name}: needs /metrics on port http (the API port), has {eps}")
        if relabel(eps[0], "shoal_namespace") != ns:
            errors.append(f"PodMonitor {name}: shoal_namespace is not {ns!r}")
        said.append(f"scheduler job {job!r} matches {sorted(set(sched_sel + dash_sched_sel))}, shoal_namespace={ns!r}")
    elif comp == "rabbitmq":
        paths = {e["path"]: e for e in eps}
        detailed = paths.get("/metrics/detailed")
        families = (detailed or {}).get("params", {}).get("family")
        if "/metrics" not in paths or families != ["queue_coarse_metrics", "queue_consumer_count"] \
                or detailed.get("port") != "prometheus":
            errors.append(f"PodMonitor {name}: needs /metrics and /metrics/detailed with family="
                          f"[queue_coarse_metrics, queue_consumer_count] on port prometheus, has {eps}")
        jobs = [relabel(e, "job") for e in eps]
        if len(set(jobs)) != len(jobs) or None in jobs:
            errors.append(f"PodMonitor {name}: the endpoints need distinct job labels, have {jobs}")
        said.append(f"RabbitMQ /metrics + /metrics/detailed?family={'&family='.join(families or [])} (jobs {jobs})")
if errors:
    sys.exit("; ".join(errors))
print("; ".join(said) if said else "monitoring off")
PY
}

render() { # OUT ARGS...: helm template
  local out="$1"
  shift
  helm template shoal "$CHART" --namespace shoal --kube-version "$KUBE_VERSION" "${API_VERSIONS[@]}" "$@" >"$out"
}

# ---- the value sets ----------------------------------------------------------
declare -A SETS=(
  [default]="-f $CHART/ci/default-values.yaml"
  [external]="-f $CHART/ci/external-values.yaml"
  [keda-off]="-f $CHART/ci/keda-off-values.yaml"
  [daytona]="-f $CHART/values-daytona.yaml -f $CHART/ci/daytona-values.yaml"
  [bundled]="-f $CHART/ci/bundled-values.yaml"
)
ORDER=(default external keda-off daytona bundled)
for f in "$CHART"/ci/*-values.yaml; do
  name="$(basename "$f" -values.yaml)"
  [[ -v "SETS[$name]" ]] || die "value set $f is not in tests/deploy/chart.sh's list"
done

echo "== chart metadata"
if [[ -n "$workspace_version" && "$app_version" == "$workspace_version" ]]; then
  pass "appVersion $app_version = workspace version"
else
  fail "appVersion '$app_version' differs from the workspace version '$workspace_version' (Cargo.toml)"
fi
if "$PY" "$ROOT/deploy/helm/validate/values-schema.py" - | cmp -s - "$CHART/values.schema.json"; then
  pass "values.schema.json is what deploy/helm/validate/values-schema.py writes"
else
  fail "values.schema.json differs from deploy/helm/validate/values-schema.py's output (edit the script, run it)"
fi
for pair in "deploy/grafana/shoal.json files/shoal.json" "deploy/prometheus/shoal-rules.yml files/shoal-rules.yml"; do
  read -r src copy <<<"$pair"
  if out="$(same_copy "$ROOT/$src" "$CHART/$copy")"; then
    pass "$out"
  else
    fail "$out"
  fi
done
# The PodMonitors' default job names and RabbitMQ's per-queue scrape are those
# of the Prometheus tests/observability/dashboard.sh proves the dashboard and
# the rules with.
if out="$("$PY" - "$CHART/values.yaml" "$ROOT/tests/observability/dashboard.sh" "$CHART/templates/podmonitor.yaml" <<'PY'
import re, sys, yaml
jobs = yaml.safe_load(open(sys.argv[1]))["monitoring"]["podMonitor"]["jobLabels"]
script = open(sys.argv[2]).read()
template = open(sys.argv[3]).read()
test_jobs = re.findall(r"^\s*- job_name: (\S+)$", script, re.M)
test_families = re.findall(r"^\s*family: \[([^\]]*)\]$", script, re.M)
chart_families = re.findall(r"^\s*family: \[([^\]]*)\]$", template, re.M)
if sorted(jobs.values()) != sorted(test_jobs):
    sys.exit(f"job names {sorted(jobs.values())} (values.yaml) != {sorted(test_jobs)} (dashboard.sh)")
if not test_families or test_families != chart_families:
    sys.exit(f"family params {chart_families} (podmonitor.yaml) != {test_families} (dashboard.sh)")
print(f"jobs {sorted(test_jobs)} and family=[{test_families[0]}] as in tests/observability/dashboard.sh")
PY
)"; then
  pass "PodMonitor defaults: $out"
else
  fail "PodMonitor defaults: $out"
fi

MONITORED_DASHBOARD=()
MONITORED_RULES=()
for name in "${ORDER[@]}"; do
  echo "== value set: $name"
  dir="$WORK/$name"
  mkdir -p "$dir"
  read -r -a args <<<"${SETS[$name]}"

  if helm lint --strict "$CHART" "${args[@]}" >"$dir/lint.log" 2>&1; then
    pass "helm lint --strict"
  else
    sed 's/^/        /' "$dir/lint.log" >&2
    fail "helm lint --strict ($name)"
  fi

  if ! render "$dir/rendered.yaml" "${args[@]}" 2>"$dir/template.log"; then
    sed 's/^/        /' "$dir/template.log" >&2
    fail "helm template ($name)"
    continue
  fi
  pass "helm template: $(grep -c '^kind:' "$dir/rendered.yaml") objects"

  if ! split_render "$dir/rendered.yaml" "$dir"; then
    fail "reading the rendered manifests ($name)"
    continue
  fi

  if count="$(kv "$dir/rendered.yaml")"; then
    pass "kubernetes-validate --strict ($VALIDATE_AGAINST): $count built-in objects"
  else
    fail "kubernetes-validate --strict ($name)"
  fi

  if out="$(crds "$dir/objects.json" 2>&1)"; then
    pass "CRD schemas: $(tail -1 <<<"$out")"
  else
    sed 's/^/        /' <<<"$out" >&2
    fail "custom resources invalid ($name)"
  fi

  # The ScaledObject counts exactly the three work queues of this namespace
  # and every tenant lane of them (ADR 0041): not the retry tiers, the dead
  # letters or another fleet's queues.
  if out="$("$PY" - "$dir/objects.json" "$dir/shoal.toml" <<'PY'
import json, re, sys, tomllib
objects = json.load(open(sys.argv[1]))
config = tomllib.load(open(sys.argv[2], "rb"))
ns = config.get("namespace", "shoal")
tiers = config.get("broker", {}).get("retry_tiers_s", [5, 30, 120, 600])
scaled = [o for o in objects if o["kind"] == "ScaledObject"]
if not scaled:
    hpa = [o for o in objects if o["kind"] == "HorizontalPodAutoscaler"]
    if not hpa or hpa[0]["spec"]["scaleTargetRef"]["name"] != next(
            o["metadata"]["name"] for o in objects
            if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-worker")):
        sys.exit("KEDA off but no HPA on the worker Deployment")
    print("KEDA off: the HPA fallback targets the worker Deployment")
    sys.exit(0)
meta = scaled[0]["spec"]["triggers"][0]["metadata"]
pattern = re.compile(meta["queueName"])
lanes = ["", ".acme", ".team~b"] + [
    "." + t.replace(".", "~") for t in config.get("tenants", {}) if t != "*"]
want = [f"{ns}.work.{p}{lane}" for p in ("high", "normal", "low") for lane in lanes]
other = [f"{ns}.retry.{t}s" for t in tiers] + [f"{ns}.dead", f"{ns}.work", f"{ns}.doorbell", f"{ns}.wake",
         f"x{ns}.work.high", f"{ns}.work.highx", f"{ns}.work.high.x.y", f"{ns}.work.high.",
         "other.work.normal", "other.work.normal.acme"]
bad = [q for q in want if not pattern.search(q)] + [q for q in other if pattern.search(q)]
if bad or meta.get("useRegex") != "true" or meta.get("operation") != "sum" \
        or meta.get("excludeUnacknowledged") != "false" or meta.get("mode") != "QueueLength":
    sys.exit(f"queue selection wrong for {bad} or trigger metadata {meta}")
slots = config.get("worker", {}).get("slots", 4)
if meta["value"] != str(slots):
    sys.exit(f"target {meta['value']} is not worker.slots = {slots}")
print(f"{meta['queueName']} selects the {len(want)} work queues and none of {len(other)} others; {slots} tasks per worker")
PY
)"; then
    pass "KEDA trigger: $out"
  else
    fail "KEDA trigger ($name): $out"
  fi

  # One value drives both: the worker pod's grace period follows
  # worker.drain_timeout_s, its probes and port follow worker.metrics_listen.
  if out="$("$PY" - "$dir/objects.json" "$dir/shoal.toml" <<'PY'
import json, sys, tomllib
objects = json.load(open(sys.argv[1]))
worker_cfg = tomllib.load(open(sys.argv[2], "rb")).get("worker", {})
dep = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-worker"))
pod = dep["spec"]["template"]["spec"]
c = pod["containers"][0]
drain = worker_cfg.get("drain_timeout_s", 60)
grace = pod["terminationGracePeriodSeconds"]
if grace <= drain:
    sys.exit(f"terminationGracePeriodSeconds {grace} does not exceed drain_timeout_s {drain}")
port = int(worker_cfg["metrics_listen"].rsplit(":", 1)[1])
ports = {p["name"]: p["containerPort"] for p in c["ports"]}
probes = (c["livenessProbe"]["httpGet"], c["readinessProbe"]["httpGet"])
if ports.get("metrics") != port or [p["path"] for p in probes] != ["/healthz", "/readyz"] \
        or any(p["port"] != "metrics" for p in probes):
    sys.exit(f"probes {probes} / ports {ports} do not follow metrics_listen {worker_cfg['metrics_listen']}")
env = {e["name"] for e in c["env"]}
if not {"POD_NAME", "POD_NAMESPACE"} <= env:
    sys.exit("POD_NAME/POD_NAMESPACE missing from the worker's env")
print(f"grace {grace} s = drain {drain} s + {grace - drain} s; /healthz and /readyz on :{port}; POD_NAME/POD_NAMESPACE set")
PY
)"; then
    pass "worker pod: $out"
  else
    fail "worker pod ($name): $out"
  fi

  if out="$(configmap_sizes "$dir/objects.json" 2>&1)"; then
    pass "ConfigMap sizes: $out"
  else
    fail "ConfigMap size ($name): $out"
  fi

  if out="$(monitoring_wiring "$dir/objects.json" "$dir/shoal.toml" 2>&1)"; then
    pass "monitoring: $out"
    [[ "$out" == *"dashboard ConfigMap"* ]] && MONITORED_DASHBOARD+=("$name")
    [[ "$out" == *"PrometheusRule ="* ]] && MONITORED_RULES+=("$name")
  else
    fail "monitoring ($name): $out"
  fi

  for comp in scheduler worker; do
    if out="$(check_config "$dir" "$comp" 2>&1)"; then
      pass "$(cat "$dir/cmd.$comp") --check-config: $out"
    else
      sed 's/^/        /' <<<"$out" >&2
      fail "$(cat "$dir/cmd.$comp") refuses the rendered ConfigMap ($name)"
    fi
  done
done

echo "== monitoring coverage"
if ((${#MONITORED_DASHBOARD[@]} > 0 && ${#MONITORED_RULES[@]} > 0)); then
  pass "dashboard ConfigMap checked in: ${MONITORED_DASHBOARD[*]}; PrometheusRule in: ${MONITORED_RULES[*]}"
else
  fail "no value set enables monitoring.dashboard (${MONITORED_DASHBOARD[*]:-none}) or monitoring.rules (${MONITORED_RULES[*]:-none}): nothing checked them"
fi

# ---- negative checks: each validator must be able to fail -------------------
echo "== negative checks (each must fail)"
neg="$WORK/negative"
mkdir -p "$neg"

# The schema refuses a misspelt config key.
if render "$neg/typo.yaml" --set config.worker.slotz=3 2>"$neg/typo.log"; then
  fail "values.schema.json accepted config.worker.slotz"
else
  pass "values.schema.json refuses config.worker.slotz: $(grep -o "additional properties 'slotz' not allowed" "$neg/typo.log" || head -1 "$neg/typo.log")"
fi

# Past the schema, the real loaders refuse the same key...
mkdir -p "$neg/unknown"
render "$neg/unknown/rendered.yaml" --skip-schema-validation --set config.worker.slotz=3
split_render "$neg/unknown/rendered.yaml" "$neg/unknown"
for comp in scheduler worker; do
  if out="$(check_config "$neg/unknown" "$comp" 2>&1)"; then
    fail "$comp --check-config accepted worker.slotz: $out"
  elif grep -q slotz <<<"$out"; then
    pass "$comp --check-config refuses worker.slotz: $(head -1 <<<"$out")"
  else
    fail "$comp --check-config failed without naming slotz: $out"
  fi
done

# ...and a value the schema allows but the loader's rules do not.
mkdir -p "$neg/renew"
render "$neg/renew/rendered.yaml" --set config.worker.lease_renew_s=20
split_render "$neg/renew/rendered.yaml" "$neg/renew"
if out="$(check_config "$neg/renew" worker 2>&1)"; then
  fail "shoal-worker --check-config accepted lease_renew_s=20 > lease_ttl_s/2: $out"
elif grep -q "worker.lease_renew_s" <<<"$out"; then
  pass "shoal-worker --check-config refuses lease_renew_s > lease_ttl_s/2: $(head -1 <<<"$out")"
else
  fail "shoal-worker --check-config failed without naming worker.lease_renew_s: $out"
fi

# A broken manifest fails kubernetes-validate: the worker Deployment with a
# misspelt securityContext field.
"$PY" - "$WORK/default/objects.json" "$neg/broken.yaml" <<'PY'
import json, sys, yaml
objects = json.load(open(sys.argv[1]))
worker = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-worker"))
worker["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privilegd"] = True
yaml.safe_dump(worker, open(sys.argv[2], "w"))
PY
if "$SHOAL_KV" --strict -k "$VALIDATE_AGAINST" "$neg/broken.yaml" >"$neg/broken.log" 2>&1; then
  fail "kubernetes-validate accepted a Deployment with securityContext.privilegd"
else
  pass "kubernetes-validate refuses securityContext.privilegd: $(grep -o "'privilegd' was unexpected" "$neg/broken.log" | head -1)"
fi

# A broken ScaledObject fails the KEDA schema.
"$PY" - "$WORK/default/objects.json" "$neg/broken-keda.json" <<'PY'
import json, sys
objects = json.load(open(sys.argv[1]))
scaled = next(o for o in objects if o["kind"] == "ScaledObject")
scaled["spec"]["minReplicaCount"] = "one"
del scaled["spec"]["scaleTargetRef"]["name"]
json.dump([scaled], open(sys.argv[2], "w"))
PY
if out="$(crds "$neg/broken-keda.json" 2>&1)"; then
  fail "the KEDA schema accepted a ScaledObject without scaleTargetRef.name: $out"
else
  pass "the KEDA schema refuses a broken ScaledObject: $(grep -o 'INVALID: .*' <<<"$out" | head -1)"
fi

# A broken PrometheusRule fails the Prometheus Operator's schema: a rule
# without expr, a `for` that is not a duration.
"$PY" - "$WORK/bundled/objects.json" "$neg/broken-rule.json" <<'PY'
import json, sys
objects = json.load(open(sys.argv[1]))
rule = next(o for o in objects if o["kind"] == "PrometheusRule")
rules = rule["spec"]["groups"][0]["rules"]
del rules[0]["expr"]
next(r for r in rules if "for" in r)["for"] = "five minutes"
json.dump([rule], open(sys.argv[2], "w"))
PY
if out="$(crds "$neg/broken-rule.json" 2>&1)"; then
  fail "the PrometheusRule schema accepted a rule without expr and for: five minutes: $out"
else
  pass "the PrometheusRule schema refuses a broken rule: $(grep -o 'INVALID: .*' <<<"$out" | cut -c1-110 | head -1)"
fi

# A dashboard ConfigMap near the API server's limit is refused by the size check.
"$PY" - "$WORK/bundled/objects.json" "$neg/big-dashboard.json" <<'PY'
import json, sys
objects = json.load(open(sys.argv[1]))
cm = next(o for o in objects if o["kind"] == "ConfigMap" and "shoal.json" in o.get("data", {}))
cm["data"]["shoal.json"] += " " * (950 * 1024)
json.dump([cm], open(sys.argv[2], "w"))
PY
if out="$(configmap_sizes "$neg/big-dashboard.json" 2>&1)"; then
  fail "the size check accepted a 950 KiB dashboard ConfigMap: $out"
else
  pass "the size check refuses a 950 KiB ConfigMap: $(cut -c1-90 <<<"$out")"
fi

# A stale copy of the dashboard is reported, with the command to refresh it.
cp "$CHART/files/shoal.json" "$neg/stale-shoal.json"
printf ' ' >>"$neg/stale-shoal.json"
if out="$(same_copy "$ROOT/deploy/grafana/shoal.json" "$neg/stale-shoal.json")"; then
  fail "the copy check accepted a dashboard copy one byte longer: $out"
elif grep -q 'sync-files.sh' <<<"$out"; then
  pass "the copy check refuses a stale copy: ...${out: -45}"
else
  fail "the copy check failed without naming deploy/helm/sync-files.sh: $out"
fi

# The wiring check notices a RabbitMQ PodMonitor without the per-queue
# endpoint, and a PrometheusRule that is not the project's rules.
"$PY" - "$WORK/bundled/objects.json" "$neg/no-detailed.json" <<'PY'
import json, sys
objects = json.load(open(sys.argv[1]))
pm = next(o for o in objects if o["kind"] == "PodMonitor" and o["metadata"]["name"].endswith("-rabbitmq"))
pm["spec"]["podMetricsEndpoints"] = [e for e in pm["spec"]["podMetricsEndpoints"] if e["path"] == "/metrics"]
rule = next(o for o in objects if o["kind"] == "PrometheusRule")
rule["spec"]["groups"][0]["rules"].pop()
sched = next(o for o in objects if o["kind"] == "PodMonitor" and o["metadata"]["name"].endswith("-scheduler"))
for r in sched["spec"]["podMetricsEndpoints"][0]["relabelings"]:
    if r["targetLabel"] == "job":
        r["replacement"] = "api"
json.dump(objects, open(sys.argv[2], "w"))
PY
if out="$(monitoring_wiring "$neg/no-detailed.json" "$WORK/bundled/shoal.toml" 2>&1)"; then
  fail "the monitoring check accepted RabbitMQ without /metrics/detailed: $out"
elif grep -q '/metrics/detailed' <<<"$out" && grep -q 'spec.groups differ' <<<"$out" &&
  grep -q "job 'api' not selected" <<<"$out"; then
  pass "the monitoring check refuses a missing /metrics/detailed endpoint, a truncated PrometheusRule and a scheduler job the rules do not select"
else
  fail "the monitoring check failed without naming all three faults: $out"
fi

# The schema refuses a worker job name the rules would not select.
if render "$neg/job.yaml" --set monitoring.podMonitor.jobLabels.worker=workers 2>"$neg/job.log"; then
  fail "values.schema.json accepted monitoring.podMonitor.jobLabels.worker=workers"
else
  pass "values.schema.json refuses a worker job without shoal-worker: $(grep -o "does not match pattern.*" "$neg/job.log" | head -1 || head -1 "$neg/job.log")"
fi
if render "$neg/job.yaml" --set monitoring.podMonitor.jobLabels.scheduler=api 2>"$neg/job.log"; then
  fail "values.schema.json accepted monitoring.podMonitor.jobLabels.scheduler=api"
else
  pass "values.schema.json refuses a scheduler job without shoal-scheduler: $(grep -o "does not match pattern.*" "$neg/job.log" | head -1 || head -1 "$neg/job.log")"
fi

# The Daytona-only preset refuses a local template (it could not run there).
if render "$neg/daytona-local.yaml" -f "$CHART/values-daytona.yaml" \
  --set config.sandbox.templates.build.provider=local 2>"$neg/daytona-local.log"; then
  fail "the Daytona-only preset accepted a local template"
else
  pass "the Daytona-only preset refuses a local template: $(grep -o 'template "build".*' "$neg/daytona-local.log" | cut -c1-60)..."
fi

# Unprivileged bubblewrap workers live in a 65536-uid user namespace: the
# chart refuses sandbox uids outside it rather than render pods that fail.
if render "$neg/unpriv.yaml" --set worker.localSandbox.privileged=false 2>"$neg/unpriv.log"; then
  fail "worker.localSandbox.privileged=false accepted sandbox uids beyond the pod's user namespace"
else
  pass "unprivileged local workers refuse uid_base + uid_count > 65536: $(grep -o 'must be at most 65536' "$neg/unpriv.log")"
fi

echo "== $CHECKS checks, $FAILURES failed"
if ((FAILURES > 0)); then
  echo "chart.sh: FAILED ($FAILURES of $CHECKS checks)" >&2
  exit 1
fi
echo "chart.sh: all chart checks passed"
