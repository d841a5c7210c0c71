#!/usr/bin/env python3
"""Evaluates every panel target of a Grafana dashboard against a real Prometheus.

    PROM=http://127.0.0.1:9090 NS=<namespace> TASKS=<n> check_panels.py wait-final
    PROM=... NS=... check_panels.py check deploy/grafana/shoal.json

`wait-final` polls (bounded) until Prometheus has scraped the run's final
values: every task finished, nothing running, the dead-lettered message in
`<ns>.dead`, and every loaded rule evaluated.

`check` resolves the dashboard's template variables the way Grafana does (the
query variables' `label_values(...)` run against the same Prometheus, their
`regex` applied; textboxes take their value; `namespace` must offer NS and is
set to it; `model`, `template` and `tenant` must offer the run's `sim`,
`default` and `default` and keep their default "All"; textboxes keep their
defaults), substitutes Grafana's interval macros, and runs
every target's expression through /api/v1/query. A target fails on an error,
an empty result, or a result that is only NaN; any failure fails the check and
names the panel. Before that, a negative self-check feeds the same checker
wrong expressions and requires each to be reported as failing. Finally every
alerting and recording rule Prometheus loaded must have evaluated without
error. Standard library only.
"""

import json
import math
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

PROM = os.environ["PROM"].rstrip("/")
NS = os.environ["NS"]
# The window Grafana's $__rate_interval stands for here: it covers the whole run
# (under two minutes), so rates of counters that moved early are not zero.
RATE_INTERVAL = os.environ.get("RATE_INTERVAL", "5m")
MACROS = {
    "$__rate_interval": RATE_INTERVAL,
    "${__rate_interval}": RATE_INTERVAL,
    "$__interval": "15s",
    "${__interval}": "15s",
    "$__range": RATE_INTERVAL,
    "${__range}": RATE_INTERVAL,
}
OVERRIDES = {"namespace": NS}
# Values the run produced, which the variables' queries must offer.
MUST_OFFER = {
    "model": os.environ.get("MODEL", "sim"),
    "template": os.environ.get("TEMPLATE", "default"),
    "tenant": os.environ.get("TENANT", "default"),
}


def api(path, params=None):
    url = f"{PROM}{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params, doseq=True)
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as err:
        # Prometheus answers bad queries with 400/422 and a JSON error body.
        try:
            return json.load(err)
        except ValueError:
            return {"status": "error", "error": f"HTTP {err.code}"}


def query(expr):
    """(ok, message, results) of an instant query."""
    body = api("/api/v1/query", {"query": expr})
    if body.get("status") != "success":
        return False, f"error: {body.get('errorType', '')} {body.get('error', body)}", []
    data = body["data"]
    if data["resultType"] == "scalar":
        result = [{"metric": {}, "value": data["result"]}]
    else:
        result = data["result"]
    if not result:
        return False, "empty result", []
    values = [float(r["value"][1]) for r in result]
    if all(math.isnan(v) for v in values):
        return False, f"only NaN ({len(values)} series)", result
    return True, f"{len(result)} series", result


def scalar(expr):
    ok, _, result = query(expr)
    return float(result[0]["value"][1]) if ok else None


# ------------------------------------------------------------------ wait-final
def wait_final():
    tasks = int(os.environ["TASKS"])
    dead = int(os.environ.get("DEAD", "1"))
    sel = f'shoal_namespace="{NS}"'
    conditions = [
        (f"sum(shoal_tasks_finished_total{{{sel}}})", lambda v: v is not None and v >= tasks, f">= {tasks} finished"),
        (f"sum(shoal_tasks_running{{{sel}}})", lambda v: v == 0, "0 running"),
        (f'count(up{{job="shoal-worker", {sel}}} == 1)', lambda v: v == 2, "2 workers up"),
        (f'count(up{{job="shoal-scheduler", {sel}}} == 1)', lambda v: v == 1, "the scheduler up"),
        (f'sum(rabbitmq_detailed_queue_messages{{queue="{NS}.dead"}})', lambda v: v is not None and v >= dead, f">= {dead} dead-lettered"),
        ("count(rabbitmq_identity_info)", lambda v: v is not None and v >= 1, "RabbitMQ scraped"),
        # RabbitMQ refreshes queue metrics every collect_statistics_interval
        # (5 s): wait until they show the work queues empty too.
        (f'sum(rabbitmq_detailed_queue_messages{{queue=~"{NS}\\\\.work\\\\..+"}})', lambda v: v == 0,
         "work queues empty in RabbitMQ's metrics"),
    ]
    deadline = time.monotonic() + 60
    while True:
        pending = []
        for expr, good, what in conditions:
            value = scalar(expr)
            if not good(value):
                pending.append(f"{what} (now {value})")
        rules = api("/api/v1/rules").get("data", {}).get("groups", [])
        unevaluated = [
            r["name"]
            for grp in rules
            for r in grp["rules"]
            if r.get("lastEvaluation", "").startswith("0001-")
        ]
        if not rules:
            pending.append("rules loaded")
        if unevaluated:
            pending.append(f"rules evaluated ({len(unevaluated)} not yet)")
        if not pending:
            # Then one more scrape of every target after the values settled.
            settled = time.time()
            while True:
                oldest = scalar(f'min(timestamp(up{{{sel}}}) or timestamp(up{{job=~"rabbitmq.*"}}))')
                if oldest is not None and oldest > settled:
                    print("    Prometheus has the final values")
                    return 0
                if time.monotonic() > deadline:
                    print("    no scrape after the values settled", file=sys.stderr)
                    return 1
                time.sleep(0.2)
        if time.monotonic() > deadline:
            print("    still waiting for: " + "; ".join(pending), file=sys.stderr)
            return 1
        time.sleep(0.5)


# --------------------------------------------------------------------- traffic
# Series the panels read that must have increased while Prometheus watched
# them (over the window $__rate_interval stands for), else rates are 0 and
# percentiles NaN for want of traffic, not for a wrong panel.
def traffic():
    w = f'shoal_namespace="{NS}"'
    r = RATE_INTERVAL
    needs = [
        (f"sum by (kind) (increase(shoal_tasks_started_total{{{w}}}[{r}])) > 0", 2, "starts of both kinds"),
        (f"sum by (kind, state) (increase(shoal_tasks_finished_total{{{w}}}[{r}])) > 0", 4,
         "exec succeeded/failed/timed_out and agent succeeded"),
        (f"sum by (kind) (increase(shoal_tasks_run_seconds_count{{{w}}}[{r}])) > 0", 2, "run times of both kinds"),
        (f'sum by (outcome) (increase(shoal_llm_call_seconds_count{{{w}, outcome=~"ok|server"}}[{r}])) > 0', 2,
         "LLM attempts ok and failed"),
        (f"sum(increase(shoal_llm_calls_total{{{w}}}[{r}])) > 0", 1, "LLM calls"),
        (f'sum by (tenant) (increase(shoal_llm_cost_microdollars_total{{{w}, tenant="default"}}[{r}])) > 0', 1,
         "LLM cost of tenant default"),
        (f"sum(increase(shoal_llm_tokens_total{{{w}}}[{r}])) > 0", 1, "LLM tokens"),
        (f"sum(increase(shoal_pool_lease_seconds_count{{{w}}}[{r}])) > 0", 1, "sandbox leases"),
        (f"sum(increase(shoal_pool_create_seconds_count{{{w}}}[{r}])) > 0", 1, "sandbox creations"),
        (f'sum by (priority) (increase(shoal_tasks_queue_wait_seconds_count{{{w}, priority=~"high|normal"}}[{r}])) > 0',
         2, "queue waits of high and normal priority"),
        (f'sum(increase(shoal_tasks_retries_total{{{w}, reason="leased_elsewhere"}}[{r}])) > 0', 1,
         "a leased_elsewhere retry"),
        (f'sum(increase(shoal_tasks_dead_letters_total{{{w}, reason="malformed"}}[{r}])) > 0', 1,
         "a malformed dead letter"),
        (f'sum(increase(shoal_llm_retries_total{{{w}, class="server"}}[{r}])) > 0', 1, "an LLM retry of class server"),
        (f'sum by (tool) (increase(shoal_agent_tool_calls_total{{{w}, tool=~"terminal|finish", outcome="ok"}}[{r}])) > 0',
         2, "terminal and finish tool calls"),
        (f"sum(increase(shoal_agent_steps_total{{{w}}}[{r}])) > 0", 1, "agent steps"),
        (f"sum(increase(shoal_events_published_total{{{w}}}[{r}])) > 0", 1, "events published"),
        (f"sum by (kind, priority) (increase(shoal_scheduler_tasks_submitted_total{{{w}}}[{r}])) > 0", 3,
         "submissions of exec normal, exec high and agent normal"),
        (f'sum(increase(shoal_scheduler_submit_seconds_count{{{w}, outcome="accepted"}}[{r}])) > 0', 1,
         "accepted submit requests"),
        (f'sum(increase(shoal_scheduler_broker_confirm_seconds_count{{{w}, outcome="ok"}}[{r}])) > 0', 1,
         "publisher-confirm rounds"),
    ]
    missing = []
    for expr, count, what in needs:
        ok, _, result = query(expr)
        if not ok or len(result) < count:
            missing.append(f"{what} ({len(result)} of {count} series moved)")
    if missing:
        print("    not yet seen moving: " + "; ".join(missing))
        return 1
    print("    every series the panels read has moved while scraped")
    return 0


# ----------------------------------------------------------------------- check
def resolve_variables(dashboard):
    values = {}
    problems = []
    for var in dashboard.get("templating", {}).get("list", []):
        name, kind = var["name"], var["type"]
        if kind == "datasource":
            continue
        if kind in ("textbox", "constant", "custom"):
            values[name] = OVERRIDES.get(name, var.get("query", ""))
            continue
        if kind != "query":
            problems.append(f"variable {name}: type {kind} is not handled by this check")
            continue
        q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        q = substitute(q, values)
        m = re.fullmatch(r"\s*label_values\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)\s*", q, re.S)
        if not m:
            problems.append(f"variable {name}: {q!r} is not label_values(selector, label)")
            continue
        selector, label = m.group(1), m.group(2)
        body = api(f"/api/v1/label/{label}/values", {"match[]": selector})
        if body.get("status") != "success":
            problems.append(f"variable {name}: {q}: {body.get('error')}")
            continue
        found = body["data"]
        regex = var.get("regex") or ""
        if regex:
            pattern = re.compile(regex[1:-1] if regex.startswith("/") else regex)
            picked = []
            for v in found:
                mm = pattern.search(v)
                if mm:
                    picked.append(mm.group(1) if mm.groups() else mm.group(0))
            found = sorted(set(picked))
        if not found:
            problems.append(f"variable {name}: {q} offers no value")
            continue
        if name in MUST_OFFER and MUST_OFFER[name] not in found:
            problems.append(f"variable {name}: {q} does not offer {MUST_OFFER[name]!r} (offers {found[:10]})")
            continue
        if name in OVERRIDES:
            if OVERRIDES[name] not in found:
                problems.append(f"variable {name}: {q} does not offer {OVERRIDES[name]!r} (offers {found[:10]})")
                continue
            values[name] = OVERRIDES[name]
        elif var.get("includeAll") and var.get("allValue"):
            values[name] = var["allValue"]  # "All", the default selection
        elif var.get("multi"):
            values[name] = "(" + "|".join(re.escape(v) for v in found) + ")"
        else:
            values[name] = found[0]
        print(f"    ${name} = {values[name]}  (the variable's query offers {len(found)} value(s))")
    return values, problems


def substitute(expr, values):
    for macro, value in MACROS.items():
        expr = expr.replace(macro, value)
    # Longest names first, so $model does not eat into $models.
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    return expr


def panels_of(dashboard):
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # collapsed rows keep theirs inside


def check_targets(items, values, bad="FAIL "):
    """items: (panel title, refId, expr). Returns the failures, each printed
    with `bad` ("caught" for the self-check's wrong expressions)."""
    failures = []
    for title, ref, raw in items:
        expr = substitute(raw, values)
        if re.search(r"\$[A-Za-z_{]", expr):
            failures.append((title, ref, expr, "unsubstituted variable"))
            print(f"  {bad} {title} [{ref}]: unsubstituted variable in {expr}")
            continue
        ok, message, result = query(expr)
        if ok:
            sample = ", ".join(
                f"{'{' + ','.join(f'{k}={v}' for k, v in sorted(r['metric'].items()) if k != '__name__') + '}'}={float(r['value'][1]):.4g}"
                for r in result[:3]
            )
            print(f"  ok    {title} [{ref}]: {message}: {sample}")
        else:
            failures.append((title, ref, expr, message))
            print(f"  {bad} {title} [{ref}]: {message}\n        {expr}")
    return failures


def check(path):
    with open(path) as f:
        dashboard = json.load(f)
    print("==> template variables")
    values, problems = resolve_variables(dashboard)
    for p in problems:
        print(f"  FAIL  {p}")

    items = []
    panels = 0
    for panel in panels_of(dashboard):
        if panel.get("type") == "row":
            continue
        panels += 1
        tgts = [t for t in panel.get("targets", []) if not t.get("hide")]
        if not tgts:
            problems.append(f"panel {panel.get('title')!r} has no target")
        for t in tgts:
            if "expr" not in t:
                problems.append(f"panel {panel.get('title')!r} target {t.get('refId')} has no expr")
                continue
            items.append((panel.get("title", "?"), t.get("refId", "?"), t["expr"]))

    ids = [p.get("id") for p in panels_of(dashboard)]
    if len(ids) != len(set(ids)):
        problems.append(f"panel ids are not unique: {ids}")
    for panel in panels_of(dashboard):
        pos = panel.get("gridPos", {})
        if pos.get("x", 0) + pos.get("w", 0) > 24 or not pos.get("h"):
            problems.append(f"panel {panel.get('title')!r}: gridPos {pos} does not fit the 24-column grid")
        if panel.get("type") != "row":
            sources = [panel.get("datasource")] + [t.get("datasource") for t in panel.get("targets", [])]
            if any(ds != {"type": "prometheus", "uid": "${datasource}"} for ds in sources):
                problems.append(f"panel {panel.get('title')!r} does not use the ${{datasource}} variable")

    print("==> negative self-check: wrong expressions must be reported")
    wrong = [
        ("self-check: misspelt metric", "X", "sum(rate(shoal_task_started_total[$__rate_interval]))"),
        ("self-check: label value that never occurs", "Y", 'shoal_tasks_finished_total{state="no-such-state"}'),
        ("self-check: syntax error", "Z", "sum(rate(shoal_tasks_started_total[$__rate_interval])"),
        ("self-check: other namespace", "W", 'rabbitmq_detailed_queue_messages{queue="$namespace-none.dead"}'),
        ("self-check: only NaN", "V", "histogram_quantile(0.5, sum by (le) (rate(shoal_tasks_run_seconds_bucket[$__rate_interval])) * 0)"),
        ("self-check: unknown variable", "U", "sum(shoal_tasks_running{instance=\"$no_such_variable\"})"),
    ]
    caught = check_targets(wrong, values, bad="caught")
    if len(caught) != len(wrong):
        missed = {ref for _, ref, _ in wrong} - {ref for _, ref, _, _ in caught}
        print(f"FAIL: the checker passed wrong expressions {sorted(missed)}: it cannot be trusted")
        return 1
    print(f"    all {len(wrong)} wrong expressions were reported")

    print(f"==> {panels} panels, {len(items)} targets")
    failures = check_targets(items, values)

    print("==> rules loaded by Prometheus")
    groups = api("/api/v1/rules").get("data", {}).get("groups", [])
    nrules = 0
    for grp in groups:
        for rule in grp["rules"]:
            nrules += 1
            if rule.get("health") != "ok":
                problems.append(f"rule {rule['name']} ({grp['file']}): health {rule.get('health')}: {rule.get('lastError')}")
    if nrules == 0:
        problems.append("Prometheus loaded no rule")
    firing = sorted(
        {r["name"] for grp in groups for r in grp["rules"] if r.get("type") == "alerting" and r.get("state") != "inactive"}
    )
    print(f"    {nrules} rules, all evaluated without error" if not problems else f"    {nrules} rules")
    print(f"    alerts pending/firing now: {firing or 'none'}")

    problems += check_rules_live(groups)

    for p in problems:
        print(f"  FAIL  {p}")
    if failures or problems:
        print(f"FAIL: {len(failures)} of {len(items)} targets and {len(problems)} other problem(s); see above")
        return 1
    print(f"PASS: {panels} panels, {len(items)} targets: every one returned data")
    return 0


# Metrics the rules read that this run cannot produce (none today).
NOT_IN_RUN = set()


def check_rules_live(groups):
    """The rules against the run's real series: every metric a rule reads
    exists, every recording rule has a value (for this namespace where it has
    the label), and the dead-letters the run caused fire ShoalDeadLetters
    (reason malformed)."""
    problems = []
    names = set()
    for grp in groups:
        for rule in grp["rules"]:
            expr = re.sub(r'"[^"]*"', '""', rule["query"])  # no label values
            expr = re.sub(r"\{[^}]*\}", "{}", expr)  # no label names
            expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
            for name in re.findall(r"(?<![\w:])([a-z_][a-z0-9_]*)(?=\s*[\[{)]|\s*$|\s*[=!<>*/+-])", expr):
                if name not in PROMQL_WORDS:
                    names.add(name)
    for name in sorted(names - NOT_IN_RUN):
        ok, message, _ = query(f'count({{__name__="{name}"}})')
        if not ok:
            problems.append(f"the rules read {name}, which the run's Prometheus does not have ({message})")
    print(f"    metrics the rules read, all present in the run: {', '.join(sorted(names - NOT_IN_RUN))}")
    for grp in groups:
        for rule in grp["rules"]:
            if rule.get("type") != "recording":
                continue
            name = rule["name"]
            selector = f'{name}{{shoal_namespace="{NS}"}}' if name.startswith("shoal_namespace:") else name
            ok, message, result = query(selector)
            if not ok and "NaN" not in message:
                problems.append(f"recording rule {selector}: {message}")
            else:
                print(f"    recording rule {selector} = {result[0]['value'][1]}")
    firing = [
        a for a in api("/api/v1/alerts")["data"]["alerts"]
        if a["labels"].get("alertname") == "ShoalDeadLetters" and a["labels"].get("shoal_namespace") == NS
        and a["labels"].get("reason") == "malformed"
    ]
    if not firing:
        problems.append(f"ShoalDeadLetters is not active for {NS} although the run dead-lettered messages")
    else:
        print(f"    ShoalDeadLetters is {firing[0]['state']} for {NS}, as the run's dead-letters require")
    return problems


PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "rate", "increase", "delta", "deriv", "irate", "vector", "scalar",
    "label_replace", "min_over_time", "max_over_time", "avg_over_time", "histogram_quantile", "clamp_min", "and", "or",
    "unless", "by", "on", "ignoring", "group_left", "group_right", "bool", "offset", "absent", "time",
}


if __name__ == "__main__":
    if sys.argv[1] == "wait-final":
        sys.exit(wait_final())
    elif sys.argv[1] == "traffic":
        sys.exit(traffic())
    elif sys.argv[1] == "check":
        sys.exit(check(sys.argv[2]))
    sys.exit(f"unknown command {sys.argv[1]}")
