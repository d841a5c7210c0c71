{{/* Names and labels. */}}
{{- define "shoal.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "shoal.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "shoal.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "shoal.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: shoal
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component: (dict "ctx" $ "component" "worker"). */}}
{{- define "shoal.selectorLabels" -}}
app.kubernetes.io/name: {{ include "shoal.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "shoal.componentLabels" -}}
{{ include "shoal.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "shoal.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "shoal.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "shoal.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The port of an address like 0.0.0.0:8080 or [::]:9464. */}}
{{- define "shoal.portOf" -}}
{{- $port := regexFind "[0-9]+$" (toString .) -}}
{{- if not $port -}}{{- fail (printf "cannot read a port from %q" .) -}}{{- end -}}
{{- $port -}}
{{- end -}}

{{- define "shoal.schedulerPort" -}}
{{- include "shoal.portOf" (dig "scheduler" "listen" "127.0.0.1:8080" .Values.config) -}}
{{- end -}}

{{- define "shoal.workerPort" -}}
{{- $listen := dig "worker" "metrics_listen" "127.0.0.1:9464" .Values.config -}}
{{- if or (not $listen) (hasPrefix "127." $listen) (hasPrefix "[::1]" $listen) -}}
{{- fail "config.worker.metrics_listen must be a non-loopback address in a pod (the kubelet probes /healthz and /readyz on the pod's IP), e.g. 0.0.0.0:9464" -}}
{{- end -}}
{{- include "shoal.portOf" $listen -}}
{{- end -}}

{{- define "shoal.drainTimeout" -}}
{{- dig "worker" "drain_timeout_s" 60 .Values.config | int64 -}}
{{- end -}}

{{- define "shoal.workerGracePeriod" -}}
{{- add (include "shoal.drainTimeout" . | int64) (.Values.worker.terminationGraceMarginSeconds | int64) -}}
{{- end -}}

{{- define "shoal.slots" -}}
{{- dig "worker" "slots" 4 .Values.config | int64 -}}
{{- end -}}

{{- define "shoal.namespacePrefix" -}}
{{- dig "namespace" "shoal" .Values.config -}}
{{- end -}}

{{/*
Helm reads every number in values as float64, and toToml writes 4 as 4.0;
Shoal's loader wants integers for counts and sizes. Turns every whole
float64 of a map (recursively, lists included) into int64, in place.
*/}}
{{- define "shoal.intify" -}}
{{- $m := . -}}
{{- range $k, $v := $m -}}
{{- if kindIs "float64" $v -}}
{{- if eq (floor $v) $v -}}{{- $_ := set $m $k (int64 $v) -}}{{- end -}}
{{- else if kindIs "map" $v -}}
{{- include "shoal.intify" $v -}}
{{- else if kindIs "slice" $v -}}
{{- $out := list -}}
{{- range $v -}}
{{- if and (kindIs "float64" .) (eq (floor .) .) -}}
{{- $out = append $out (int64 .) -}}
{{- else -}}
{{- $out = append $out . -}}
{{- end -}}
{{- end -}}
{{- $_ := set $m $k $out -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Where the scheduler's tokens file is mounted. */}}
{{- define "shoal.tokensPath" -}}/etc/shoal/tokens/tokens{{- end -}}

{{/* The TOML configuration file. */}}
{{- define "shoal.configToml" -}}
{{- $config := deepCopy .Values.config -}}
{{- if .Values.secrets.schedulerTokens.existingSecret -}}
{{- $scheduler := default dict (get $config "scheduler") -}}
{{- $_ := set $scheduler "tokens_file" (include "shoal.tokensPath" .) -}}
{{- $_ := set $config "scheduler" $scheduler -}}
{{- end -}}
{{- include "shoal.intify" $config -}}
{{- toToml $config -}}
{{- end -}}

{{/* Bundled services. */}}
{{- define "shoal.servicesSecret" -}}{{ include "shoal.fullname" . }}-services{{- end -}}
{{- define "shoal.rabbitmqHost" -}}{{ include "shoal.fullname" . }}-rabbitmq{{- end -}}
{{- define "shoal.redisHost" -}}{{ include "shoal.fullname" . }}-redis{{- end -}}

{{/* (name, key) of the Secret holding a URL: the bundled one, or the reference. */}}
{{- define "shoal.brokerSecretRef" -}}
{{- if .Values.rabbitmq.enabled -}}
name: {{ include "shoal.servicesSecret" . }}
key: amqp-url
{{- else -}}
name: {{ required "secrets.broker.existingSecret is required (or rabbitmq.enabled)" .Values.secrets.broker.existingSecret }}
key: {{ .Values.secrets.broker.key }}
{{- end -}}
{{- end -}}

{{- define "shoal.redisSecretRef" -}}
{{- if .Values.redis.enabled -}}
name: {{ include "shoal.servicesSecret" . }}
key: redis-url
{{- else -}}
name: {{ required "secrets.redis.existingSecret is required (or redis.enabled)" .Values.secrets.redis.existingSecret }}
key: {{ .Values.secrets.redis.key }}
{{- end -}}
{{- end -}}

{{- define "shoal.managementSecretRef" -}}
{{- if .Values.rabbitmq.enabled -}}
name: {{ include "shoal.servicesSecret" . }}
key: management-url
{{- else -}}
name: {{ required "secrets.rabbitmqManagement.existingSecret is required for KEDA's rabbitmq scaler (or rabbitmq.enabled, or autoscaling.keda.enabled=false)" .Values.secrets.rabbitmqManagement.existingSecret }}
key: {{ .Values.secrets.rabbitmqManagement.key }}
{{- end -}}
{{- end -}}

{{/* Environment common to the scheduler and the workers. */}}
{{- define "shoal.commonEnv" -}}
- name: SHOAL_CONFIG
  value: /etc/shoal/shoal.toml
- name: SHOAL__BROKER__URL
  valueFrom:
    secretKeyRef:
      {{- include "shoal.brokerSecretRef" . | nindent 6 }}
- name: SHOAL__REDIS__URL
  valueFrom:
    secretKeyRef:
      {{- include "shoal.redisSecretRef" . | nindent 6 }}
{{- end -}}

{{/* The secrets only workers use: LLM keys and the Daytona key. */}}
{{- define "shoal.workerSecretEnv" -}}
{{- range .Values.secrets.llm }}
- name: {{ .env }}
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .key }}
{{- end }}
{{- if .Values.secrets.daytona.existingSecret }}
- name: {{ dig "daytona" "api_key_env" "DAYTONA_API_KEY" .Values.config }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.secrets.daytona.existingSecret }}
      key: {{ .Values.secrets.daytona.key }}
{{- end }}
{{- end -}}

{{/* The templates of config.sandbox, with `default` local unless overridden. */}}
{{- define "shoal.checkDaytonaOnly" -}}
{{- $templates := dig "sandbox" "templates" dict .Values.config -}}
{{- $default := get $templates "default" -}}
{{- if or (not $default) (ne (get ($default | default dict) "provider" | default "local") "daytona") -}}
{{- fail "worker.sandboxProvider=daytona needs config.sandbox.templates.default.provider = \"daytona\" (the built-in default template is local)" -}}
{{- end -}}
{{- range $name, $t := $templates -}}
{{- if ne (get $t "provider" | default "local") "daytona" -}}
{{- fail (printf "worker.sandboxProvider=daytona: template %q is not provider = \"daytona\"; its sandboxes could not run in a pod without privilege" $name) -}}
{{- end -}}
{{- end -}}
{{- if not .Values.secrets.daytona.existingSecret -}}
{{- fail "worker.sandboxProvider=daytona needs secrets.daytona.existingSecret (the Daytona API key)" -}}
{{- end -}}
{{- end -}}

{{- define "shoal.workerServiceAccountName" -}}
{{- if .Values.rbac.create -}}
{{- include "shoal.serviceAccountName" . }}-worker
{{- else -}}
{{- include "shoal.serviceAccountName" . -}}
{{- end -}}
{{- end -}}

{{- define "shoal.egressRule" -}}
{{- $rule := dict -}}
{{- if .cidrs -}}
{{- $to := list -}}
{{- range .cidrs }}{{ $to = append $to (dict "ipBlock" (dict "cidr" .)) }}{{ end -}}
{{- $_ := set $rule "to" $to -}}
{{- end -}}
{{- if .ports -}}
{{- $ports := list -}}
{{- range .ports }}{{ $ports = append $ports (dict "protocol" "TCP" "port" (int .)) }}{{ end -}}
{{- $_ := set $rule "ports" $ports -}}
{{- end -}}
{{- if $rule }}{{ toYaml (list $rule) }}{{ end -}}
{{- end }}

{{- define "shoal.scaleBehavior" -}}
scaleDown:
  stabilizationWindowSeconds: {{ .scaleDownStabilizationSeconds }}
  selectPolicy: Min
  policies:
    - type: Pods
      value: {{ .scaleDownPodsPerPeriod }}
      periodSeconds: {{ .scaleDownPeriodSeconds }}
scaleUp:
  stabilizationWindowSeconds: 0
  selectPolicy: Max
  policies:
    - type: Percent
      value: 100
      periodSeconds: 30
    - type: Pods
      value: 4
      periodSeconds: 30
{{- end }}

{{/* The unprivileged local profile works only within its limits (ADR 0020). */}}
{{- define "shoal.checkUnprivilegedLocal" -}}
{{- $sandbox := dig "sandbox" dict .Values.config -}}
{{- $base := get $sandbox "uid_base" | default 200000 | int64 -}}
{{- $count := get $sandbox "uid_count" | default 50000 | int64 -}}
{{- if gt (add $base $count) 65536 -}}
{{- fail (printf "worker.localSandbox.privileged=false runs the pod in a user namespace of 65536 uids: config.sandbox.uid_base + uid_count (%d) must be at most 65536" (add $base $count)) -}}
{{- end -}}
{{- if ne (get $sandbox "cgroups" | default "auto") "off" -}}
{{- fail "worker.localSandbox.privileged=false: the cgroupfs is read-only in an unprivileged pod; set config.sandbox.cgroups = \"off\"" -}}
{{- end -}}
{{- range $name, $t := (get $sandbox "templates" | default dict) -}}
{{- if and (get $t "network") (ne (get $sandbox "network_isolation" | default "namespace") "host") -}}
{{- fail (printf "worker.localSandbox.privileged=false: template %q has network = true, whose slirp4netns needs /dev/net/tun, which an unprivileged pod does not get; use privileged workers" $name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
