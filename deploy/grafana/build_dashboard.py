#!/usr/bin/env python3
"""Builds deploy/grafana/shoal.json, the Shoal fleet dashboard (docs/adr/0023).

    python3 deploy/grafana/build_dashboard.py            # rewrite shoal.json
    python3 deploy/grafana/build_dashboard.py --check F  # exit 1 if F differs

Plain Python, no dependency: the JSON is Grafana 11's dashboard model. Every
panel target is evaluated against a real Prometheus by
tests/observability/dashboard.sh, so only metrics that exist are used
(docs/metrics.md): the scheduler's /metrics (scheduler/src/metrics.rs), the
worker's /metrics (worker/src/metrics.rs, worker/src/pool/metrics.rs) and
RabbitMQ's rabbitmq_prometheus plugin, per queue from /metrics/detailed
(families queue_coarse_metrics and queue_consumer_count).
"""

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "shoal.json"
DS = {"type": "prometheus", "uid": "${datasource}"}

# Worker series: of this Shoal namespace when the scrape adds a
# `shoal_namespace` target label, else every worker (the label absent).
W = 'shoal_namespace=~"$namespace|"'
# The namespace's queues (docs/adr/0004: every queue is `<ns>.…`).
# The three tiers and every tenant lane of them (docs/adr/0041).
WORK_Q = 'queue=~"$namespace\\\\.work\\\\.(high|normal|low)(\\\\.[^.]+)?"'
RETRY_Q = 'queue=~"$namespace\\\\.retry\\\\..+"'
DEAD_Q = 'queue="$namespace.dead"'
RI = "$__rate_interval"


class Layout:
    """Places panels left to right in rows of 24 grid units."""

    def __init__(self):
        self.panels = []
        self.x = 0
        self.y = 0
        self.row_h = 0
        self.next_id = 1

    def _id(self):
        self.next_id += 1
        return self.next_id - 1

    def row(self, title):
        self._newline()
        self.panels.append(
            {
                "type": "row",
                "id": self._id(),
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y},
                "panels": [],
            }
        )
        self.y += 1

    def _newline(self):
        if self.x:
            self.y += self.row_h
            self.x = 0
            self.row_h = 0

    def add(self, panel, w, h):
        if self.x + w > 24:
            self._newline()
        panel["id"] = self._id()
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)


def target(expr, legend="__auto", ref="A"):
    return {
        "datasource": DS,
        "editorMode": "code",
        "expr": expr,
        "legendFormat": legend,
        "range": True,
        "refId": ref,
    }


def targets(*pairs):
    return [target(e, l, chr(ord("A") + i)) for i, (e, l) in enumerate(pairs)]


def timeseries(title, description, tgts, unit="short", stack=False, min0=True):
    custom = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never"}
    if stack:
        custom["stacking"] = {"mode": "normal", "group": "A"}
    defaults = {"unit": unit, "custom": custom}
    if min0:
        defaults["min"] = 0
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": tgts,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "table", "placement": "bottom", "showLegend": True, "calcs": ["lastNotNull", "max"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def stat(title, description, tgts, unit="short", thresholds=None, kind="stat"):
    steps = thresholds or [{"color": "green", "value": None}]
    panel = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": tgts,
        "fieldConfig": {
            "defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}},
            "overrides": [],
        },
        "options": {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "area",
            "textMode": "auto",
        },
    }
    if kind == "gauge":
        panel["fieldConfig"]["defaults"].update({"min": 0, "max": 1})
        panel["options"] = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "showThresholdLabels": False,
            "showThresholdMarkers": True,
        }
    return panel


def quantiles(metric_bucket, by, selector, legend_prefix):
    return targets(
        *[
            (
                f"histogram_quantile({q}, sum by (le, {by}) (rate({metric_bucket}{{{selector}}}[{RI}])))",
                f"p{int(q * 100)} {legend_prefix}",
            )
            for q in (0.5, 0.95, 0.99)
        ]
    )


def build():
    g = Layout()
    red_at = lambda v: [{"color": "green", "value": None}, {"color": "red", "value": v}]  # noqa: E731

    # ---- overview
    g.row("Overview")
    g.add(
        stat(
            "Workers up",
            "Worker scrape targets answering (`up` of the jobs matching $worker_job).",
            targets((f'sum(up{{job=~"$worker_job", {W}}})', "up")),
        ),
        3,
        4,
    )
    g.add(
        stat(
            "Schedulers up",
            "Scheduler scrape targets answering (`up` of the jobs matching $scheduler_job).",
            targets((f'sum(up{{job=~"$scheduler_job", {W}}})', "up")),
        ),
        3,
        4,
    )
    g.add(
        stat("Tasks running", "Task runs in progress on all workers.", targets((f"sum(shoal_tasks_running{{{W}}})", "running"))),
        3,
        4,
    )
    g.add(
        stat(
            "Work waiting (ready)",
            "Messages ready in the namespace's work queues: tasks no worker has taken yet.",
            targets((f"sum(rabbitmq_detailed_queue_messages_ready{{{WORK_Q}}})", "ready")),
        ),
        3,
        4,
    )
    g.add(
        stat(
            "Dead-letter queue",
            "Messages in `<namespace>.dead` (dead tasks and messages that are not tasks; inspect and replay).",
            targets((f"sum(rabbitmq_detailed_queue_messages{{{DEAD_Q}}})", "dead")),
            thresholds=red_at(1),
        ),
        3,
        4,
    )
    g.add(
        stat(
            "Success ratio",
            "Share of terminal states that are `succeeded` over the rate window.",
            targets(
                (
                    f'sum(rate(shoal_tasks_finished_total{{{W}, state="succeeded"}}[{RI}])) / sum(rate(shoal_tasks_finished_total{{{W}}}[{RI}]))',
                    "succeeded",
                )
            ),
            unit="percentunit",
        ),
        3,
        4,
    )
    g.add(
        stat(
            "Queue wait p95",
            "95th percentile of how long tasks waited in the work queues before a slot took them "
            "(shoal_tasks_queue_wait_seconds, all priorities).",
            targets(
                (
                    f"histogram_quantile(0.95, sum by (le) (rate(shoal_tasks_queue_wait_seconds_bucket{{{W}}}[{RI}])))",
                    "p95",
                )
            ),
            unit="s",
            thresholds=[{"color": "green", "value": None}, {"color": "orange", "value": 60}, {"color": "red", "value": 900}],
        ),
        3,
        4,
    )
    g.add(
        stat(
            "LLM cost per hour",
            "What the agents' LLM calls cost at the current rate (configured prices), all selected models "
            "and tenants.",
            targets(
                (
                    f'sum(rate(shoal_llm_cost_microdollars_total{{{W}, model=~"$model", tenant=~"$tenant"}}[{RI}])) * 3600 / 1e6',
                    "USD/h",
                )
            ),
            unit="currencyUSD",
        ),
        3,
        4,
    )

    # ---- scheduler
    g.row("Scheduler")
    ten = f'{W}, tenant=~"$tenant"'
    g.add(
        timeseries(
            "Tasks submitted per second, by kind and priority",
            "shoal_scheduler_tasks_submitted_total: tasks the schedulers queued (broker-confirmed; "
            "idempotent replays excluded), of the selected tenants.",
            targets(
                (
                    f"sum by (kind, priority) (rate(shoal_scheduler_tasks_submitted_total{{{ten}}}[{RI}]))",
                    "{{kind}} {{priority}}",
                )
            ),
            unit="ops",
            stack=True,
        ),
        8,
        8,
    )
    g.add(
        timeseries(
            "Tasks submitted per second, by tenant",
            "shoal_scheduler_tasks_submitted_total by tenant: a configured tenant, `default`, or `other`.",
            targets(
                (f"sum by (tenant) (rate(shoal_scheduler_tasks_submitted_total{{{ten}}}[{RI}]))", "{{tenant}}")
            ),
            unit="ops",
            stack=True,
        ),
        8,
        8,
    )
    g.add(
        timeseries(
            "Submissions rejected per second, by reason",
            "shoal_scheduler_submissions_rejected_total: submit requests answered with an error, by the "
            "problem type (invalid-task, unauthorized, body-too-large, …; broker-unavailable and "
            "store-unavailable for 503s).",
            targets(
                (
                    f"sum by (reason) (rate(shoal_scheduler_submissions_rejected_total{{{W}}}[{RI}]))",
                    "{{reason}}",
                )
            ),
            unit="ops",
            stack=True,
        ),
        8,
        8,
    )
    g.add(
        timeseries(
            "Submit latency (accepted requests), by endpoint",
            "shoal_scheduler_submit_seconds{outcome=\"accepted\"}: from the request reaching the route to the "
            "response, including the publisher-confirm round and the Redis pipeline.",
            quantiles("shoal_scheduler_submit_seconds_bucket", "endpoint", f'{W}, outcome="accepted"', "{{endpoint}}"),
            unit="s",
        ),
        8,
        8,
    )
    g.add(
        timeseries(
            "Broker confirm latency",
            "shoal_scheduler_broker_confirm_seconds{outcome=\"ok\"}: one round of publisher confirms, from "
            "publishing a submission's messages to the broker's last confirm. Rises when RabbitMQ blocks "
            "publishers (memory or disk alarm).",
            quantiles("shoal_scheduler_broker_confirm_seconds_bucket", "outcome", f'{W}, outcome="ok"', "{{outcome}}"),
            unit="s",
        ),
        8,
        8,
    )
    g.add(
        timeseries(
            "Event streams (SSE) open",
            "shoal_scheduler_event_streams_open against scheduler.max_streams (summed over the schedulers), "
            "and streams refused per second because every one was taken.",
            targets(
                (f"sum(shoal_scheduler_event_streams_open{{{W}}})", "open"),
                (f"sum(shoal_scheduler_event_streams_max{{{W}}})", "max"),
                (f"sum(rate(shoal_scheduler_event_streams_refused_total{{{W}}}[{RI}]))", "refused/s"),
            ),
        ),
        8,
        8,
    )

    g.add(
        timeseries(
            "Scheduler dependencies reachable",
            "shoal_scheduler_dependency_up: 1 when every scheduler reached RabbitMQ (broker) and Redis at "
            "its last check (each scrape), 0 when any did not; the alert ShoalSchedulerDependencyDown "
            "fires after 2 minutes at 0.",
            targets((f"min by (dependency) (shoal_scheduler_dependency_up{{{W}}})", "{{dependency}}")),
        ),
        8,
        8,
    )

    # ---- throughput and outcomes
    g.row("Throughput and outcomes")
    g.add(
        timeseries(
            "Tasks started per second, by kind",
            "shoal_tasks_started_total: runs started on the workers.",
            targets((f"sum by (kind) (rate(shoal_tasks_started_total{{{W}}}[{RI}]))", "{{kind}}")),
            unit="ops",
        ),
        12,
        8,
    )
    g.add(
        timeseries(
            "Tasks finished per second, by kind and state",
            "shoal_tasks_finished_total: terminal states the workers recorded.",
            targets((f"sum by (kind, state) (rate(shoal_tasks_finished_total{{{W}}}[{RI}]))", "{{kind}} {{state}}")),
            unit="ops",
            stack=True,
        ),
        12,
        8,
    )
    g.add(
        timeseries(
            "Outcome ratios (success / failure / timeout / …)",
            "Each terminal state's share of all terminal states in the rate window.",
            targets(
                (
                    f"sum by (state) (rate(shoal_tasks_finished_total{{{W}}}[{RI}])) / ignoring(state) group_left sum(rate(shoal_tasks_finished_total{{{W}}}[{RI}]))",
                    "{{state}}",
                )
            ),
            unit="percentunit",
        ),
        12,
        8,
    )
    g.add(
        timeseries(
            "Run time percentiles, by kind",
            "shoal_tasks_run_seconds: from the start of a run to its terminal state.",
            quantiles("shoal_tasks_run_seconds_bucket", "kind", W, "{{kind}}"),
            unit="s",
        ),
        12,
        8,
    )

    # ---- workers
    g.row("Workers")
    g.add(
        stat(
            "Saturation (busy slots / slots)",
            "Share of the fleet's task slots holding a delivery: 1 - shoal_worker_slots_free / shoal_worker_slots "
            "(a draining worker's stopped slots count as busy).",
            targets(
                (
                    f"1 - sum(shoal_worker_slots_free{{{W}}}) / sum(shoal_worker_slots{{{W}}})",
                    "saturation",
                )
            ),
            unit="percentunit",
            thresholds=[
                {"color": "green", "value": None},
                {"color": "orange", "value": 0.8},
                {"color": "red", "value": 0.95},
            ],
            kind="gauge",
        ),
        6,
        8,
    )
    g.add(
        timeseries(
            "Saturation per worker",
            "Each worker's busy slots over its slots (shoal_worker_slots_free, shoal_worker_slots).",
            targets(
                (
                    f"1 - sum by (instance) (shoal_worker_slots_free{{{W}}}) / sum by (instance) (shoal_worker_slots{{{W}}})",
                    "{{instance}}",
                )
            ),
            unit="percentunit",
        ),
        6,
        8,
    )
    g.add(
        timeseries(
            "Slots and free slots",
            "The fleet's configured task slots (worker.slots summed) and the slots not holding a delivery.",
            targets(
                (f"sum(shoal_worker_slots{{{W}}})", "slots"),
                (f"sum(shoal_worker_slots_free{{{W}}})", "free"),
            ),
        ),
        6,
        8,
    )
    g.add(
        timeseries(
            "Running tasks, by worker and kind",
            "shoal_tasks_running.",
            targets((f"sum by (instance, kind) (shoal_tasks_running{{{W}}})", "{{instance}} {{kind}}")),
            stack=True,
        ),
        6,
        8,
    )

    # ---- queues
    g.row("Queues (RabbitMQ)")
    g.add(
        timeseries(
            "Work queues: ready and unacked",
            "Per priority queue: ready (waiting for a worker) and unacked (held by a running task).",
            targets(
                (f"sum by (queue) (rabbitmq_detailed_queue_messages_ready{{{WORK_Q}}})", "ready {{queue}}"),
                (f"sum by (queue) (rabbitmq_detailed_queue_messages_unacked{{{WORK_Q}}})", "unacked {{queue}}"),
            ),
        ),
        12,
        8,
    )
    g.add(
        timeseries(
            "Queue wait percentiles, by priority",
            "shoal_tasks_queue_wait_seconds: from submission (or the end of a retry delay) until a worker's "
            "slot took the task, on the wall clock. Tasks still waiting are not in it: a queue nobody takes "
            "from shows as growing ready work, not as a wait.",
            quantiles("shoal_tasks_queue_wait_seconds_bucket", "priority", W, "{{priority}}"),
            unit="s",
        ),
        12,
        8,
    )
    g.add(
        timeseries(
            "Retry tiers",
            "Messages waiting out their backoff in the TTL retry queues.",
            targets((f"sum by (queue) (rabbitmq_detailed_queue_messages{{{RETRY_Q}}})", "{{queue}}")),
            stack=True,
        ),
        8,
        8,
    )
    g.add(
        timeseries(
            "Dead-letters per minute, by reason",
            "shoal_tasks_dead_letters_total: deliveries the workers dead-lettered to `<namespace>.dead`, by "
            "reason (attempts_exhausted, malformed, too_large, …); and the broker's own delivery-limit "
            "dead-letters (a message redelivered past x-delivery-limit; every namespace of the broker).",
            targets(
                (f"sum by (reason) (rate(shoal_tasks_dead_letters_total{{{W}}}[{RI}])) * 60", "{{reason}}"),
                (
                    f"sum(rate(rabbitmq_global_messages_dead_lettered_delivery_limit_total[{RI}])) * 60",
                    "broker delivery-limit (all namespaces)",
                ),
            ),
            unit="short",
        ),
        8,
        8,
    )
    g.add(
        timeseries(
            "Retries per minute, by reason",
            "shoal_tasks_retries_total: deliveries the workers sent to a retry tier (leased_elsewhere, store, "
            "pool, sandbox, llm, …).",
            targets((f"sum by (reason) (rate(shoal_tasks_retries_total{{{W}}}[{RI}])) * 60", "{{reason}}")),
            unit="short",
        ),
        8,
        8,
    )
    g.add(
        timeseries(
            "Dead-letter queue depth",
            "Messages kept in `<namespace>.dead` for inspection and replay.",
            targets((f"sum by (queue) (rabbitmq_detailed_queue_messages{{{DEAD_Q}}})", "{{queue}}")),
        ),
        24,
        6,
    )

    # ---- LLM
    g.row("LLM")
    cost = f'{W}, model=~"$model", tenant=~"$tenant"'
    g.add(
        timeseries(
            "Cost per hour, by model",
            "shoal_llm_cost_microdollars_total at the current rate, in USD per hour (configured prices), "
            "of the selected tenants.",
            targets(
                (
                    f"sum by (model) (rate(shoal_llm_cost_microdollars_total{{{cost}}}[{RI}])) * 3600 / 1e6",
                    "{{model}}",
                )
            ),
            unit="currencyUSD",
            stack=True,
        ),
        8,
        8,
    )
    g.add(
        timeseries(
            "LLM cost per hour by tenant",
            "shoal_llm_cost_microdollars_total by tenant, in USD per hour (configured prices), of the selected "
            "models. The tenant is one of the worker's worker.metric_tenants (set it to the tenants of the "
            "scheduler's tokens), `default`, or `other` for every tenant not listed there.",
            targets(
                (
                    f"sum by (tenant) (rate(shoal_llm_cost_microdollars_total{{{cost}}}[{RI}])) * 3600 / 1e6",
                    "{{tenant}}",
                )
            ),
            unit="currencyUSD",
            stack=True,
        ),
        8,
        8,
    )
    g.add(
        timeseries(
            "Tokens per minute, by model and kind",
            "shoal_llm_tokens_total: prompt, completion, cache_read, cache_write, reasoning.",
            targets(
                (
                    f'sum by (model, kind) (rate(shoal_llm_tokens_total{{{W}, model=~"$model"}}[{RI}])) * 60',
                    "{{model}} {{kind}}",
                )
            ),
            stack=True,
        ),
        8,
        8,
    )
    g.add(
        timeseries(
            "LLM calls per second, by model",
            "shoal_llm_calls_total: calls that produced a reply (one per agent step).",
            targets((f'sum by (model) (rate(shoal_llm_calls_total{{{W}, model=~"$model"}}[{RI}]))', "{{model}}")),
            unit="ops",
        ),
        8,
        8,
    )
    g.add(
        timeseries(
            "LLM attempt latency (successful attempts)",
            "shoal_llm_call_seconds{outcome=\"ok\"}: each HTTP attempt to the provider.",
            quantiles("shoal_llm_call_seconds_bucket", "model", f'{W}, model=~"$model", outcome="ok"', "{{model}}"),
            unit="s",
        ),
        8,
        8,
    )
    g.add(
        timeseries(
            "LLM failed attempts per second, by error class",
            "shoal_llm_call_seconds_count by outcome other than ok (auth, rate_limit, server, …). "
            "A failed attempt that was not the last is a retry.",
            targets(
                (
                    f'sum by (model, outcome) (rate(shoal_llm_call_seconds_count{{{W}, model=~"$model", outcome!="ok"}}[{RI}]))',
                    "{{model}} {{outcome}}",
                )
            ),
            unit="ops",
            stack=True,
        ),
        8,
        8,
    )
    g.add(
        timeseries(
            "LLM error ratio, by model",
            "Failed attempts over all attempts.",
            targets(
                (
                    f'sum by (model) (rate(shoal_llm_call_seconds_count{{{W}, model=~"$model", outcome!="ok"}}[{RI}])) '
                    f'/ sum by (model) (rate(shoal_llm_call_seconds_count{{{W}, model=~"$model"}}[{RI}]))',
                    "{{model}}",
                )
            ),
            unit="percentunit",
        ),
        12,
        8,
    )
    g.add(
        timeseries(
            "LLM retries per second, by error class",
            "shoal_llm_retries_total: failed attempts the client tried again (rate_limit, server, timeout, "
            "connection, invalid_response). Every model.",
            targets((f"sum by (class) (rate(shoal_llm_retries_total{{{W}}}[{RI}]))", "{{class}}")),
            unit="ops",
            stack=True,
        ),
        12,
        8,
    )

    # ---- agent loop and events
    g.row("Agent loop and events")
    g.add(
        timeseries(
            "Tool calls per second, by tool and outcome",
            "shoal_agent_tool_calls_total: the agents' tool calls (terminal, file_editor, think, finish, "
            "task_tracker) by outcome (ok, error, timeout, invalid, refused, interrupted).",
            targets(
                (
                    f'sum by (tool, outcome) (rate(shoal_agent_tool_calls_total{{{W}}}[{RI}]))',
                    "{{tool}} {{outcome}}",
                )
            ),
            unit="ops",
            stack=True,
        ),
        12,
        8,
    )
    g.add(
        timeseries(
            "Tool calls not ok, by tool",
            "Share of each tool's calls whose outcome is not `ok` (error, timeout, invalid, refused, "
            "interrupted). A tool nobody called has no ratio.",
            targets(
                (
                    f'sum by (tool) (rate(shoal_agent_tool_calls_total{{{W}, outcome!="ok"}}[{RI}])) '
                    f"/ sum by (tool) (rate(shoal_agent_tool_calls_total{{{W}}}[{RI}]))",
                    "{{tool}}",
                )
            ),
            unit="percentunit",
        ),
        12,
        8,
    )
    g.add(
        timeseries(
            "Agent steps per second",
            "shoal_agent_steps_total: model replies the agent loops acted on.",
            targets((f"sum(rate(shoal_agent_steps_total{{{W}}}[{RI}]))", "steps")),
            unit="ops",
        ),
        12,
        8,
    )
    g.add(
        timeseries(
            "Task events published and dropped per second",
            "shoal_events_published_total: task events the workers wrote to Redis; "
            "shoal_events_dropped_total: events they could not write (by reason: redis, closed) — "
            "clients and the task log miss those.",
            targets(
                (f"sum(rate(shoal_events_published_total{{{W}}}[{RI}]))", "published"),
                (f"sum by (reason) (rate(shoal_events_dropped_total{{{W}}}[{RI}]))", "dropped {{reason}}"),
            ),
            unit="ops",
        ),
        12,
        8,
    )

    # ---- sandbox pool
    g.row("Sandbox pool")
    tpl = f'{W}, template=~"$template"'
    g.add(
        timeseries(
            "Pool hit ratio, by template",
            "Warm leases (`hit`) over all leases; 0 when every lease had to create a sandbox.",
            targets(
                (
                    f'sum by (template) (rate(shoal_pool_leases_total{{{tpl}, result="hit"}}[{RI}]) '
                    f"or rate(shoal_pool_leases_total{{{tpl}}}[{RI}]) * 0) "
                    f"/ sum by (template) (rate(shoal_pool_leases_total{{{tpl}}}[{RI}]))",
                    "{{template}}",
                )
            ),
            unit="percentunit",
        ),
        8,
        8,
    )
    g.add(
        timeseries(
            "Leases per second, by result",
            "shoal_pool_leases_total: hit (warm), miss (created), timeout (pool exhausted), error.",
            targets((f"sum by (template, result) (rate(shoal_pool_leases_total{{{tpl}}}[{RI}]))", "{{template}} {{result}}")),
            unit="ops",
            stack=True,
        ),
        8,
        8,
    )
    g.add(
        timeseries(
            "Lease latency",
            "shoal_pool_lease_seconds: warm hand-over or cold create, by template.",
            quantiles("shoal_pool_lease_seconds_bucket", "template", tpl, "{{template}}"),
            unit="s",
        ),
        8,
        8,
    )
    g.add(
        timeseries(
            "Sandboxes idle and in use",
            "shoal_pool_idle (warm, waiting) and shoal_pool_in_use (leased), by template.",
            targets(
                (f"sum by (template) (shoal_pool_idle{{{tpl}}})", "idle {{template}}"),
                (f"sum by (template) (shoal_pool_in_use{{{tpl}}})", "in use {{template}}"),
            ),
        ),
        12,
        8,
    )
    g.add(
        timeseries(
            "Sandbox create time",
            "shoal_pool_create_seconds: until the new sandbox has run a command.",
            quantiles("shoal_pool_create_seconds_bucket", "template", tpl, "{{template}}"),
            unit="s",
        ),
        12,
        8,
    )
    return g.panels


def variables():
    def query_var(name, label, query, regex="", multi=False):
        v = {
            "type": "query",
            "name": name,
            "label": label,
            "datasource": DS,
            "definition": query,
            "query": {"query": query, "refId": f"PrometheusVariableQueryEditor-{name}", "qryType": 1},
            "regex": regex,
            "refresh": 2,
            "sort": 1,
            "hide": 0,
            "multi": multi,
            "includeAll": multi,
            "current": {},
            "options": [],
        }
        if multi:
            v["allValue"] = ".*"
            v["current"] = {"selected": True, "text": ["All"], "value": ["$__all"]}
        return v

    def textbox(name, label, value, description):
        return {
            "type": "textbox",
            "name": name,
            "label": label,
            "description": description,
            "query": value,
            "current": {"selected": False, "text": value, "value": value},
            "options": [{"selected": True, "text": value, "value": value}],
            "hide": 0,
        }

    return [
        {
            "type": "datasource",
            "name": "datasource",
            "label": "Data source",
            "query": "prometheus",
            "regex": "",
            "refresh": 1,
            "hide": 0,
            "current": {},
            "options": [],
        },
        query_var(
            "namespace",
            "Shoal namespace",
            'label_values(rabbitmq_detailed_queue_messages{queue=~".+\\\\.work\\\\.(high|normal|low)"}, queue)',
            regex="/^(.+)\\.work\\.(?:high|normal|low)$/",
        ),
        query_var("model", "Model", f"label_values(shoal_llm_calls_total{{{W}}}, model)", multi=True),
        query_var("template", "Sandbox template", f"label_values(shoal_pool_leases_total{{{W}}}, template)", multi=True),
        query_var(
            "tenant", "Tenant", f"label_values(shoal_scheduler_tasks_submitted_total{{{W}}}, tenant)", multi=True
        ),
        textbox(
            "worker_job",
            "Worker job (regex)",
            ".*shoal-worker.*",
            "Regex matching the Prometheus job(s) that scrape the workers' /metrics.",
        ),
        textbox(
            "scheduler_job",
            "Scheduler job (regex)",
            ".*shoal-scheduler.*",
            "Regex matching the Prometheus job(s) that scrape the schedulers' /metrics.",
        ),
    ]


def dashboard():
    return {
        "__inputs": [],
        "__requires": [
            {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "11.0.0"},
            {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
        ],
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "description": "Shoal fleet: submissions, throughput, outcomes, workers, queues, LLM cost and errors, "
        "agent loop and events, sandbox pool "
        "(docs/adr/0023-dashboard-and-alerts.md).",
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,
        "id": None,
        "links": [],
        "panels": build(),
        "refresh": "30s",
        "schemaVersion": 41,
        "tags": ["shoal"],
        "templating": {"list": variables()},
        "time": {"from": "now-3h", "to": "now"},
        "timepicker": {},
        "timezone": "utc",
        "title": "Shoal",
        "uid": "shoal-fleet",
        "version": 1,
        "weekStart": "",
    }


def render():
    return json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n"


def main(argv):
    text = render()
    if len(argv) >= 2 and argv[1] == "--check":
        path = Path(argv[2]) if len(argv) > 2 else OUT
        if not path.exists() or path.read_text() != text:
            print(f"{path} is not build_dashboard.py's output", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
