#!/usr/bin/env python3
"""Writes deploy/helm/shoal/values.schema.json (draft-07).

Edit the schema here and run `python3 deploy/helm/validate/values-schema.py`;
tests/deploy/chart.sh fails if the committed file differs from what this
prints. The `config` part mirrors shared/src/settings/*.rs (the loader
refuses unknown keys, so the schema does too); tests/deploy/chart.sh also
loads the rendered file with the real binaries, which is the final word.

Usage: values-schema.py [OUT]   (OUT defaults to the chart's file; - for stdout)
"""
import json
import os
import sys

def obj(props, required=None, strict=True, desc=None):
    o={"type":"object","properties":props}
    if strict: o["additionalProperties"]=False
    if required: o["required"]=required
    if desc: o["description"]=desc
    return o
def i(minimum=0, desc=None, maximum=None):
    o={"type":"integer","minimum":minimum}
    if maximum is not None: o["maximum"]=maximum
    if desc: o["description"]=desc
    return o
s={"type":"string"}
b={"type":"boolean"}
num={"type":"number"}
strlist={"type":"array","items":{"type":"string"}}
intlist={"type":"array","items":{"type":"integer","minimum":1}}
anyobj={"type":"object"}
anyarr={"type":"array"}
strmap={"type":"object","additionalProperties":{"type":"string"}}
secretRef=lambda: obj({"existingSecret":s,"key":{"type":"string","minLength":1}},["existingSecret","key"])
template=obj({
 "provider":{"enum":["local","daytona"]},"network":b,"network_allow":strlist,"reuse":b,"setup":strlist,
 "image_root":s,"env":{"type":"object","additionalProperties":{"type":"string"}},
 "min_idle":i(),"max_total":i(1),"create_concurrency":i(1),"lease_timeout_s":i(1),
 "limit_address_space_mb":i(),"limit_file_mb":i(),"limit_open_files":i(),"limit_processes":i(1),
 "limit_cpu_s":i(),"workspace_mb":i(1),"tmp_mb":i(),"limit_memory_mb":i(),
 "snapshot":s,"cpu":i(1),"memory_gib":i(1),"disk_gib":i(1),
 "auto_stop_minutes":i(),"auto_archive_minutes":i(),"auto_delete_minutes":{"type":"integer"}})
model=obj({
 "provider":{"enum":["openai","anthropic"]},"base_url":{"type":"string","pattern":"^https?://"},"model":s,
 "api_key_env":{"type":"string","pattern":"^[A-Za-z_][A-Za-z0-9_]*$"},
 "function_calling":{"enum":["native","emulated","constrained"]},"max_tokens":i(1),"temperature":num,
 "timeout_s":i(1),"max_retries":i(),"prompt_caching":b,
 "price_input":{"type":"number","minimum":0},"price_output":{"type":"number","minimum":0},
 "price_cache_read":{"type":"number","minimum":0},"price_cache_write":{"type":"number","minimum":0},
 "rate_limit":dict(obj({"requests_per_minute":i(1),"tokens_per_minute":i(1)}),minProperties=1)},
 ["provider","base_url","model"])
tenant=obj({"max_running":i(1),"max_running_per_model":{"type":"object","additionalProperties":i(1)},
 "daily_budget_usd":{"type":"number","minimum":0},"monthly_budget_usd":{"type":"number","minimum":0},
 "weight":i(1,desc="Share of the slots under backlog; a named tenant has a lane of its own (docs/adr/0041).")})
config=obj({
 "namespace":{"type":"string","pattern":"^[a-z0-9_-]{1,48}$"},
 "broker":obj({"url":{"type":"string","pattern":"^amqps?://"},"delivery_limit":i(1),"max_message_bytes":i(1,maximum=512<<20),"retry_tiers_s":intlist}),
 "redis":obj({"url":{"type":"string","pattern":"^(rediss?|unix)://"},"task_events_maxlen":i(1),"firehose_maxlen":i(1),"retention_s":i(),"idempotency_ttl_s":i(1),"command_timeout_ms":i(1),"outage_buffer_events":i(1),"outage_buffer_bytes":i(65536)}),
 "scheduler":obj({"listen":s,"max_body_bytes":i(),"max_batch":i(1),"tokens":{"type":"object","additionalProperties":{"type":"string"}},"tokens_file":s,"max_streams":i(1),"drain_timeout_s":i(1,maximum=3600)}),
 "worker":obj({"id":s,"slots":i(1,maximum=4096),"drain_timeout_s":i(),"lease_ttl_s":i(1),"lease_renew_s":i(1),"idle_sweep_ms":i(10,maximum=600000),"metrics_listen":s,
   "heartbeat_interval_ms":i(100,maximum=300000),
   "pod_deletion_cost":{"type":"boolean","description":"Set controller.kubernetes.io/pod-deletion-cost from how busy the worker is."},
   "metric_tenants":{"type":"array","items":{"type":"string","pattern":"^[A-Za-z0-9_.-]{1,64}$"},
     "description":"Tenants the worker's metrics label as they are (the tenants of scheduler.tokens); default is always labelled, others are other."}}),
 "sandbox":obj({"bwrap":s,"launcher":s,"root":s,"max_output_bytes":i(1),"uid_base":i(1000),"uid_count":i(1),"uid_dir":s,
   "cgroups":{"enum":["auto","off","required"]},"cgroup_root":s,"network_isolation":{"enum":["namespace","host"]},
   "templates":{"type":"object","additionalProperties":template}}),
 "limits":obj({"max_timeout_s":i(1),"max_attempts":i(1),"max_command_bytes":i(1),"max_file_bytes":i(1),"max_prompt_bytes":i(1),"max_delay_s":i(1)}),
 "telemetry":obj({"log_format":{"enum":["text","json"]},"log_filter":s}),
 "agent":obj({"default_model":s,"no_output_timeout_s":i(1),"condense_chars":i(1000)}),
 "models":{"type":"object","additionalProperties":model},
 "tenants":{"type":"object","propertyNames":{"pattern":"^([A-Za-z0-9_.-]{1,64}|[*])$"},"additionalProperties":tenant,
   "description":"Per-tenant caps, budgets and fair-share weights ([tenants.<name>]; \"*\" for every tenant not named)."},
 "daytona":obj({"api_url":{"type":"string","pattern":"^https?://"},"api_key_env":{"type":"string","pattern":"^[A-Za-z_][A-Za-z0-9_]*$"},"target":s,"toolbox_hosts":strlist}),
}, desc="Shoal's TOML configuration (shared/src/settings/*.rs); the loader refuses unknown keys, so this schema does too.")
image=obj({"repository":s,"tag":s,"pullPolicy":{"enum":["Always","IfNotPresent","Never"]}})
probe=obj({"initialDelaySeconds":i(),"periodSeconds":i(1),"timeoutSeconds":i(1),"failureThreshold":i(1),"successThreshold":i(1)})
probes=obj({"liveness":probe,"readiness":probe},["liveness","readiness"])
podCommon={"resources":anyobj,"podAnnotations":{"type":"object","additionalProperties":{"type":"string"}},"podLabels":{"type":"object","additionalProperties":{"type":"string"}},
 "nodeSelector":{"type":"object","additionalProperties":{"type":"string"}},"tolerations":anyarr,"affinity":anyobj,"topologySpreadConstraints":anyarr,
 "priorityClassName":s,"extraEnv":anyarr,"probes":probes,"command":{"type":"array","items":s,"minItems":1}}
rule=obj({"cidrs":strlist,"ports":{"type":"array","items":{"type":"integer","minimum":1,"maximum":65535}}})
persistence=obj({"size":s,"storageClass":s})
svcImage=obj({"repository":s,"tag":s,"pullPolicy":{"enum":["Always","IfNotPresent","Never"]}},["repository","tag"])
caps=["AUDIT_WRITE","CHOWN","DAC_OVERRIDE","DAC_READ_SEARCH","FOWNER","FSETID","KILL","MKNOD","NET_ADMIN","NET_BIND_SERVICE","NET_RAW","SETFCAP","SETGID","SETPCAP","SETUID","SYS_ADMIN","SYS_CHROOT","SYS_PTRACE","SYS_RESOURCE"]
root=obj({
 "global":anyobj,
 "nameOverride":s,"fullnameOverride":s,"commonLabels":{"type":"object","additionalProperties":{"type":"string"}},
 "image":image,"imagePullSecrets":anyarr,
 "config":config,
 "secrets":obj({"broker":secretRef(),"redis":secretRef(),"rabbitmqManagement":secretRef(),"daytona":secretRef(),
   "llm":{"type":"array","items":obj({"env":{"type":"string","pattern":"^[A-Za-z_][A-Za-z0-9_]*$"},"existingSecret":{"type":"string","minLength":1},"key":{"type":"string","minLength":1}},["env","existingSecret","key"])},
   "schedulerTokens":dict(secretRef(), description="An existing Secret whose key holds the scheduler's tokens file: "
     "`sha256:<64 hex> <tenant>` lines (`shoal token hash`), tenant `*` for an admin token (ADR 0036).")}),
 "serviceAccount":obj({"create":b,"name":s,"annotations":{"type":"object","additionalProperties":{"type":"string"}}}),
 "rbac":obj({"create":b}),
 "scheduler":obj(dict(podCommon, replicas=i(0), preStopSleepSeconds=i(0), terminationGracePeriodSeconds=i(0),
   service=obj({"type":{"enum":["ClusterIP","NodePort","LoadBalancer"]},"port":i(1,maximum=65535),"annotations":{"type":"object","additionalProperties":{"type":"string"}}}),
   ingress=obj({"enabled":b,"className":s,"annotations":{"type":"object","additionalProperties":{"type":"string"}},
     "hosts":{"type":"array","items":obj({"host":s,"paths":{"type":"array","items":obj({"path":s,"pathType":{"enum":["Prefix","Exact","ImplementationSpecific"]}},["path","pathType"])}},["host","paths"])},"tls":anyarr}),
   pdb=obj({"enabled":b,"minAvailable":{"type":["integer","string"]}}))),
 "worker":obj(dict(podCommon, replicas=i(0), sandboxProvider={"enum":["local","daytona"]},
   localSandbox=obj({"privileged":b,"capabilities":{"type":"array","items":{"enum":caps},"uniqueItems":True}}),
   stateVolume=obj({"sizeLimit":s,"medium":{"enum":["","Memory"]}}),
   terminationGraceMarginSeconds=i(0),
   pdb=obj({"enabled":b,"maxUnavailable":{"type":["integer","string"]}}))),
 "autoscaling":obj({"minReplicas":i(0),"maxReplicas":i(1),"scaleDownStabilizationSeconds":i(0,maximum=3600),"scaleDownPodsPerPeriod":i(1),"scaleDownPeriodSeconds":i(1,maximum=1800),
   "keda":obj({"enabled":b,"pollingInterval":i(1),"cooldownPeriod":i(0),"activationValue":i(0),"protocol":{"enum":["http"]},"vhostName":s}),
   "hpa":obj({"enabled":b,"targetCPUUtilizationPercentage":i(1,maximum=100),"metrics":anyarr})}),
 "networkPolicy":obj({"enabled":b,
   "egress":obj({"broker":rule,"redis":rule,"llm":rule,"sandboxProvider":rule,"kubernetesApi":rule,"extra":{"type":"array","items":rule}}),
   "dns":obj({"namespaceSelector":{"type":"object","additionalProperties":{"type":"string"}},"podSelector":{"type":"object","additionalProperties":{"type":"string"}}}),
   "schedulerIngressFrom":anyarr,"metricsIngressFrom":anyarr}),
 "monitoring":obj({
   "podMonitor":obj({"enabled":b,"interval":s,"labels":strmap,
     "jobLabels":obj({"worker":{"type":"string","pattern":"shoal-worker","description":"must contain shoal-worker: the rules and the dashboard select up{job=~\".*shoal-worker.*\"}"},
                      "scheduler":{"type":"string","pattern":"shoal-scheduler","description":"must contain shoal-scheduler: the rules and the dashboard select up{job=~\".*shoal-scheduler.*\"}"},
                      "rabbitmq":{"type":"string","minLength":1},"rabbitmqQueues":{"type":"string","minLength":1}},["worker","scheduler","rabbitmq","rabbitmqQueues"])}),
   "dashboard":obj({"enabled":b,"label":{"type":"string","minLength":1},"labelValue":s,"namespace":s,"annotations":strmap}),
   "rules":obj({"enabled":b,"labels":strmap})}),
 "rabbitmq":obj({"enabled":b,"image":svcImage,"consumerTimeoutMarginSeconds":i(0),"persistence":persistence,"resources":anyobj}),
 "redis":obj({"enabled":b,"image":svcImage,"persistence":persistence,"resources":anyobj}),
})
root["$schema"]="http://json-schema.org/draft-07/schema#"
root["title"]="Shoal Helm chart values"
out={"$schema":root.pop("$schema"),"title":root.pop("title")}
out.update(root)
text = json.dumps(out, indent=2) + "\n"
default = os.path.join(os.path.dirname(__file__), "..", "shoal", "values.schema.json")
target = sys.argv[1] if len(sys.argv) > 1 else default
if target == "-":
    sys.stdout.write(text)
else:
    with open(target, "w") as f:
        f.write(text)
