{{/* Names, labels and the derived settings every template shares. */}}

{{- define "cotmon.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name; the release name alone when it already contains the chart name. */}}
{{- define "cotmon.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "cotmon.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "cotmon.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cotmon.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "cotmon.labels" -}}
helm.sh/chart: {{ include "cotmon.chart" . }}
{{ include "cotmon.selectorLabels" . }}
app.kubernetes.io/version: {{ include "cotmon.imageTag" . | replace "+" "_" | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: cotmon
{{- end }}

{{- /* The tag `make image` gives: appVersion, and appVersion-cuda (VARIANT=cuda) for pods with GPUs. */ -}}
{{- define "cotmon.imageTag" -}}
{{- .Values.image.tag | default (printf "%s%s" .Chart.AppVersion (ternary "-cuda" "" (gt (int .Values.gpu) 0))) }}
{{- end }}

{{- define "cotmon.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "cotmon.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* True ("true") when transcripts go to a SQLite file in the data directory. */}}
{{- define "cotmon.sqlite" -}}
{{- if eq .Values.store.type "sqlite" }}true{{ end }}
{{- end }}

{{/* True when the data directory is a PersistentVolumeClaim (SQLite with persistence). */}}
{{- define "cotmon.dataClaim" -}}
{{- if and (include "cotmon.sqlite" .) .Values.persistence.enabled }}true{{ end }}
{{- end }}

{{- define "cotmon.secretName" -}}
{{- default (include "cotmon.fullname" .) .Values.secret.existingSecret }}
{{- end }}

{{/* True when the chart renders its own Secret: no existingSecret and at least one value set. */}}
{{- define "cotmon.renderSecret" -}}
{{- $s := .Values.secret }}
{{- if and (not $s.existingSecret) (or $s.apiKey $s.judgeApiKey $s.upstreamApiKey .Values.store.url) }}true{{ end }}
{{- end }}

{{/*
An env entry reading `key` from the Secret, when the Secret has it: always with existingSecret
(optional, since the chart cannot see its keys), else when `value` is set.
Call with (dict "root" $ "name" "ENV_NAME" "key" "secret-key" "value" <value in values>).
*/}}
{{- define "cotmon.secretEnv" -}}
{{- $root := .root }}
{{- if or $root.Values.secret.existingSecret .value }}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ include "cotmon.secretName" $root }}
      key: {{ .key }}
      {{- if $root.Values.secret.existingSecret }}
      optional: true
      {{- end }}
{{- end }}
{{- end }}

{{/* The in-cluster URL of the Service, no trailing slash. */}}
{{- define "cotmon.serviceURL" -}}
{{- printf "http://%s.%s.svc.cluster.local:%v" (include "cotmon.fullname" .) .Release.Namespace .Values.service.port }}
{{- end }}

{{/*
COTMON_ALLOWED_HOSTS: the names other pods and browsers reach cotmon by (the Service's DNS names,
the ingress hosts, viewer.externalURL's host), then config.allowedHosts. cotmon always allows
localhost (sidecar agents, port-forwards) and does not check the Host of probes and /metrics,
which come addressed to the pod IP.
*/}}
{{- define "cotmon.allowedHosts" -}}
{{- $fullname := include "cotmon.fullname" . }}
{{- $ns := .Release.Namespace }}
{{- $hosts := list $fullname (printf "%s.%s" $fullname $ns) (printf "%s.%s.svc" $fullname $ns) (printf "%s.%s.svc.cluster.local" $fullname $ns) }}
{{- if .Values.ingress.enabled }}
{{- range .Values.ingress.hosts }}
{{- $hosts = append $hosts .host }}
{{- end }}
{{- end }}
{{- with .Values.viewer.externalURL }}
{{- $hosts = append $hosts (urlParse .).host }}
{{- end }}
{{- join "," (uniq (concat $hosts .Values.config.allowedHosts)) }}
{{- end }}

{{/* The viewer's base URL in alert links: viewer.externalURL, else the in-cluster Service URL. */}}
{{- define "cotmon.viewerURL" -}}
{{- if .Values.viewer.externalURL }}
{{- .Values.viewer.externalURL | trimSuffix "/" }}
{{- else }}
{{- include "cotmon.serviceURL" . }}
{{- end }}
{{- end }}

{{/* Inline YAML from values (a string, or a mapping rendered as YAML); "" when unset. */}}
{{- define "cotmon.inlineYaml" -}}
{{- if kindIs "string" . }}
{{- . }}
{{- else if . }}
{{- toYaml . }}
{{- end }}
{{- end }}

{{/* Checks that fail the render with a message saying what to change. */}}
{{- define "cotmon.validate" -}}
{{- if and (eq .Values.mode "sidecar") (not .Values.agent.image) }}
{{- fail "mode: sidecar needs agent.image: the image of the agent container that runs beside cotmon (e.g. --set agent.image=ghcr.io/example/agent:1.0)" }}
{{- end }}
{{- if and (include "cotmon.sqlite" .) (gt (int .Values.replicaCount) 1) }}
{{- fail (printf "replicaCount %v with store.type sqlite: one SQLite file cannot be shared by replicas; use PostgreSQL (store.type: postgresql with store.url, or the key %q of secret.existingSecret), see helm/examples/values-postgres.yaml" .Values.replicaCount .Values.secret.keys.storeURL) }}
{{- end }}
{{- if and (include "cotmon.sqlite" .) .Values.store.url }}
{{- fail "store.url is set but store.type is sqlite: set store.type: postgresql to use it" }}
{{- end }}
{{- if and (eq .Values.store.type "postgresql") (not .Values.store.url) (not .Values.secret.existingSecret) }}
{{- fail (printf "store.type postgresql needs its URL: store.url, or secret.existingSecret holding it under the key %q" .Values.secret.keys.storeURL) }}
{{- end }}
{{- $grace := include "cotmon.terminationGracePeriodSeconds" . | int }}
{{- if le (float64 $grace) (float64 .Values.config.drainSeconds) }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must exceed config.drainSeconds (%v), or in-flight streams are killed before they drain" $grace .Values.config.drainSeconds) }}
{{- end }}
{{- end }}

{{- define "cotmon.terminationGracePeriodSeconds" -}}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add (int (ceil .Values.config.drainSeconds)) 15 }}
{{- else }}
{{- .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/* True when a policy or detectors file is given inline (the -files ConfigMap exists). */}}
{{- define "cotmon.hasFiles" -}}
{{- if or (include "cotmon.inlineYaml" .Values.policy) (include "cotmon.inlineYaml" .Values.detectors) }}true{{ end }}
{{- end }}

{{/* The cotmon container's env besides the ConfigMap: secrets, then extraEnv. */}}
{{- define "cotmon.cotmonEnv" -}}
{{- $keys := .Values.secret.keys }}
{{- include "cotmon.secretEnv" (dict "root" . "name" "COTMON_API_KEY" "key" $keys.apiKey "value" .Values.secret.apiKey) }}
{{- include "cotmon.secretEnv" (dict "root" . "name" "COTMON_JUDGE_API_KEY" "key" $keys.judgeApiKey "value" .Values.secret.judgeApiKey) }}
{{- include "cotmon.secretEnv" (dict "root" . "name" "COTMON_UPSTREAM_API_KEY" "key" $keys.upstreamApiKey "value" .Values.secret.upstreamApiKey) }}
{{- if eq .Values.store.type "postgresql" }}
- name: COTMON_STORE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "cotmon.secretName" . }}
      key: {{ $keys.storeURL }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "cotmon.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (include "cotmon.imageTag" .) }}
{{- end }}
{{- end }}
