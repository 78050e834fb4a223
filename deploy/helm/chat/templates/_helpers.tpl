{{/* Names, labels and the parts gateways and workers share. */}}

{{- define "chat.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "chat.fullname" -}}
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

{{/* Name of one component's objects: <fullname>-gateway, <fullname>-fanout. */}}
{{- define "chat.componentName" -}}
{{- printf "%s-%s" (include "chat.fullname" .root | trunc 55 | trimSuffix "-") .component -}}
{{- end -}}

{{- define "chat.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "chat.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: chat
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "chat.selectorLabels" -}}
app.kubernetes.io/name: {{ include "chat.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "chat.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "chat.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "chat.image" -}}
{{- $image := .Values.image -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository (default .Chart.AppVersion $image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The gateway's termination grace: given, or preStop sleep + twice the drain grace + 5 s. */}}
{{- define "chat.gateway.terminationGrace" -}}
{{- $g := .Values.gateway -}}
{{- $floor := add $g.preStopSleepSecs $g.drainGraceSecs -}}
{{- if kindIs "invalid" $g.terminationGracePeriodSeconds -}}
{{- add $floor $g.drainGraceSecs 5 -}}
{{- else if le (int $g.terminationGracePeriodSeconds) (int $floor) -}}
{{- fail (printf "gateway.terminationGracePeriodSeconds (%v) must exceed gateway.preStopSleepSecs + gateway.drainGraceSecs (%v): the kubelet would kill gateways before their drain ends" $g.terminationGracePeriodSeconds $floor) -}}
{{- else -}}
{{- $g.terminationGracePeriodSeconds -}}
{{- end -}}
{{- end -}}

{{/* Consistency checks the schema cannot express; included by every workload. */}}
{{- define "chat.validate" -}}
{{- $v := .Values -}}
{{- if and (ne $v.nats.auth.mode "none") (not $v.nats.auth.existingSecret) -}}
{{- fail (printf "nats.auth.mode %s needs nats.auth.existingSecret (the Secret holding the credentials)" $v.nats.auth.mode) -}}
{{- end -}}
{{- if and $v.nats.tls.caSecret $v.nats.tls.caConfigMap -}}
{{- fail "nats.tls: set caSecret or caConfigMap, not both" -}}
{{- end -}}
{{- if and $v.cql.tls.caSecret $v.cql.tls.caConfigMap -}}
{{- fail "cql.tls: set caSecret or caConfigMap, not both" -}}
{{- end -}}
{{- if and $v.auth.adminToken.fanout (not $v.auth.adminToken.existingSecret) -}}
{{- fail "auth.adminToken.fanout needs auth.adminToken.existingSecret" -}}
{{- end -}}
{{- if and $v.metrics.serviceMonitor.enabled $v.auth.jwt.existingSecret (not $v.auth.adminToken.existingSecret) -}}
{{- fail "metrics.serviceMonitor: with client auth on (auth.jwt.existingSecret) a gateway's /metrics needs the admin token, and is closed without one: set auth.adminToken.existingSecret (it also turns on /admin on the gateways) or disable the ServiceMonitor" -}}
{{- end -}}
{{- if and $v.gateway.autoscaling.enabled (gt (int $v.gateway.autoscaling.minReplicas) (int $v.gateway.autoscaling.maxReplicas)) -}}
{{- fail "gateway.autoscaling.minReplicas exceeds maxReplicas" -}}
{{- end -}}
{{- end -}}

{{/* A CA file mounted from a Secret or a ConfigMap: volume entry. */}}
{{- define "chat.caVolume" -}}
{{- if .tls.caSecret }}
- name: {{ .name }}
  secret:
    secretName: {{ .tls.caSecret }}
    defaultMode: 0444
    items:
      - key: {{ .tls.caKey }}
        path: ca.crt
{{- else if .tls.caConfigMap }}
- name: {{ .name }}
  configMap:
    name: {{ .tls.caConfigMap }}
    defaultMode: 0444
    items:
      - key: {{ .tls.caKey }}
        path: ca.crt
{{- end }}
{{- end -}}

{{/* Volumes of both workloads: /tmp, the backends' CA files, the NATS nkey seed. */}}
{{- define "chat.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: 16Mi
{{- include "chat.caVolume" (dict "name" "nats-ca" "tls" .Values.nats.tls) }}
{{- include "chat.caVolume" (dict "name" "cql-ca" "tls" .Values.cql.tls) }}
{{- if eq .Values.nats.auth.mode "nkey" }}
- name: nats-nkey
  secret:
    secretName: {{ .Values.nats.auth.existingSecret }}
    defaultMode: 0440
    items:
      - key: {{ .Values.nats.auth.nkeySeedKey }}
        path: user.nk
{{- end }}
{{- end -}}

{{- define "chat.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if or .Values.nats.tls.caSecret .Values.nats.tls.caConfigMap }}
- name: nats-ca
  mountPath: /etc/chat/nats-ca
  readOnly: true
{{- end }}
{{- if or .Values.cql.tls.caSecret .Values.cql.tls.caConfigMap }}
- name: cql-ca
  mountPath: /etc/chat/cql-ca
  readOnly: true
{{- end }}
{{- if eq .Values.nats.auth.mode "nkey" }}
- name: nats-nkey
  mountPath: /etc/chat/nats-nkey
  readOnly: true
{{- end }}
{{- end -}}

{{- define "chat.secretEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ .secret }}
      key: {{ .key }}
{{- end -}}

{{/* Environment of both workloads: NATS, CQL, telemetry, logging. */}}
{{- define "chat.backendEnv" -}}
{{- $v := .Values -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: CHAT_NATS_URL
  value: {{ join "," $v.nats.urls | quote }}
- name: CHAT_STREAM_REPLICAS
  value: {{ $v.nats.streamReplicas | quote }}
{{- with $v.nats.auth }}
{{- if eq .mode "userPassword" }}
{{ include "chat.secretEnv" (dict "name" "CHAT_NATS_USER" "secret" .existingSecret "key" .userKey) }}
{{ include "chat.secretEnv" (dict "name" "CHAT_NATS_PASSWORD" "secret" .existingSecret "key" .passwordKey) }}
{{- else if eq .mode "token" }}
{{ include "chat.secretEnv" (dict "name" "CHAT_NATS_TOKEN" "secret" .existingSecret "key" .tokenKey) }}
{{- else if eq .mode "nkey" }}
- name: CHAT_NATS_NKEY_SEED_FILE
  value: /etc/chat/nats-nkey/user.nk
{{- end }}
{{- end }}
{{- if or $v.nats.tls.caSecret $v.nats.tls.caConfigMap }}
- name: CHAT_NATS_TLS_CA
  value: /etc/chat/nats-ca/ca.crt
{{- end }}
- name: CHAT_CQL_NODES
  value: {{ join "," $v.cql.contactPoints | quote }}
- name: CHAT_CQL_KEYSPACE
  value: {{ $v.cql.keyspace | quote }}
- name: CHAT_CQL_REPLICATION
  value: {{ $v.cql.replication | quote }}
{{- with $v.cql.localDc }}
- name: CHAT_CQL_LOCAL_DC
  value: {{ . | quote }}
{{- end }}
- name: CHAT_CQL_REQUEST_TIMEOUT_MS
  value: {{ $v.cql.requestTimeoutMs | quote }}
- name: CHAT_CQL_HEDGE_MS
  value: {{ $v.cql.hedgeMs | quote }}
{{- if $v.cql.auth.existingSecret }}
{{ include "chat.secretEnv" (dict "name" "CHAT_CQL_USER" "secret" $v.cql.auth.existingSecret "key" $v.cql.auth.userKey) }}
{{ include "chat.secretEnv" (dict "name" "CHAT_CQL_PASSWORD" "secret" $v.cql.auth.existingSecret "key" $v.cql.auth.passwordKey) }}
{{- end }}
{{- if or $v.cql.tls.caSecret $v.cql.tls.caConfigMap }}
- name: CHAT_CQL_TLS_CA
  value: /etc/chat/cql-ca/ca.crt
{{- end }}
- name: CHAT_LOG_FORMAT
  value: {{ $v.logFormat | quote }}
{{- with $v.rustLog }}
- name: RUST_LOG
  value: {{ . | quote }}
{{- end }}
{{- if $v.otlp.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $v.otlp.endpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ $v.otlp.protocol | quote }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: "k8s.pod.name=$(POD_NAME),k8s.namespace.name=$(POD_NAMESPACE)"
{{- end }}
{{- end -}}

{{/* Scheduling: topology spread over zones and nodes, anti-affinity by node. */}}
{{- define "chat.scheduling" -}}
{{- $c := .config -}}
{{- $selector := include "chat.selectorLabels" . -}}
{{- if $c.topologySpread.enabled }}
topologySpreadConstraints:
  - maxSkew: {{ $c.topologySpread.zoneSkew }}
    topologyKey: topology.kubernetes.io/zone
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- $selector | nindent 8 }}
    matchLabelKeys: [pod-template-hash]
  - maxSkew: {{ $c.topologySpread.hostSkew }}
    topologyKey: kubernetes.io/hostname
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- $selector | nindent 8 }}
    matchLabelKeys: [pod-template-hash]
{{- end }}
{{- if $c.affinity }}
affinity:
  {{- toYaml $c.affinity | nindent 2 }}
{{- else if eq $c.podAntiAffinity "soft" }}
affinity:
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels:
              {{- $selector | nindent 14 }}
{{- else if eq $c.podAntiAffinity "hard" }}
affinity:
  podAntiAffinity:
    requiredDuringSchedulingIgnoredDuringExecution:
      - topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- $selector | nindent 12 }}
{{- end }}
{{- with $c.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $c.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $c.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- end -}}

{{/* An HTTP probe on the named port: path plus the probe's settings from values. */}}
{{- define "chat.probe" -}}
httpGet:
  path: {{ .path }}
  port: {{ .port }}
{{- toYaml .settings | nindent 0 }}
{{- end -}}
