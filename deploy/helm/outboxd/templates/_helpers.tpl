{{/*
Every helper takes a context with .Values (this chart's values) and
.Release. Inside this chart that is the root context. A parent chart that
has outboxd as a dependency passes
  (dict "Values" .Values.outboxd "Release" .Release)
so names, labels and the container come out the same as the subchart's own
ConfigMap, Secret and Service (see README.md).
*/}}

{{- define "outboxd.name" -}}
{{- default "outboxd" .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "outboxd.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := include "outboxd.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "outboxd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "outboxd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "outboxd.labels" -}}
{{ include "outboxd.selectorLabels" . }}
app.kubernetes.io/component: outbox-relay
app.kubernetes.io/version: {{ .Values.image.tag | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- if hasKey . "Chart" }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 }}
{{- end }}
{{- end }}

{{- define "outboxd.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (toString .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The Secret the container's envFrom names, or nothing. */}}
{{- define "outboxd.secretName" -}}
{{- if .Values.secret.existingSecret }}
{{- .Values.secret.existingSecret }}
{{- else if .Values.secret.env }}
{{- include "outboxd.fullname" . }}
{{- end }}
{{- end }}

{{- define "outboxd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "outboxd.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* relay.shutdown_grace in whole seconds (rounded up); 30 when unset. */}}
{{- define "outboxd.shutdownGraceSeconds" -}}
{{- $grace := dig "relay" "shutdown_grace" "30s" .Values.config | toString }}
{{- if not (regexMatch "^[0-9]+(ms|s|m|h|d)$" $grace) }}
{{- fail (printf "config.relay.shutdown_grace: %q is not a duration such as 30s (a whole number and ms, s, m, h or d)" $grace) }}
{{- end }}
{{- $digits := regexFind "^[0-9]+" $grace }}
{{- $amount := atoi $digits }}
{{- $unit := trimPrefix $digits $grace }}
{{- if eq $unit "ms" }}
{{- div (add $amount 999) 1000 }}
{{- else }}
{{- mul $amount (get (dict "s" 1 "m" 60 "h" 3600 "d" 86400) $unit) }}
{{- end }}
{{- end }}

{{/*
The pod's terminationGracePeriodSeconds: the value given, which must be
above relay.shutdown_grace, or shutdown_grace plus 10 seconds.
*/}}
{{- define "outboxd.terminationGracePeriodSeconds" -}}
{{- $grace := include "outboxd.shutdownGraceSeconds" . | atoi }}
{{- $given := .Values.terminationGracePeriodSeconds }}
{{- if $given }}
{{- if le (int $given) $grace }}
{{- fail (printf "terminationGracePeriodSeconds (%v) must be above config.relay.shutdown_grace (%ds), or the kubelet may kill the relay while it stops" $given $grace) }}
{{- end }}
{{- int $given }}
{{- else }}
{{- add $grace 10 }}
{{- end }}
{{- end }}

{{/*
Annotations for the pod template, so a changed config or created Secret
rolls the pods.
*/}}
{{- define "outboxd.podAnnotations" -}}
checksum/outboxd-config: {{ toYaml .Values.config | sha256sum }}
{{- if and (not .Values.secret.existingSecret) .Values.secret.env }}
checksum/outboxd-secret: {{ toYaml .Values.secret.env | sha256sum }}
{{- end }}
{{- end }}

{{/* Whether the container gets the /readyz readiness probe. */}}
{{- define "outboxd.readinessEnabled" -}}
{{- $enabled := toString .Values.probes.readiness.enabled }}
{{- if eq $enabled "auto" }}
{{- eq .Values.mode "standalone" }}
{{- else if has $enabled (list "true" "false") }}
{{- $enabled }}
{{- else }}
{{- fail (printf "probes.readiness.enabled: %q is not auto, true or false" $enabled) }}
{{- end }}
{{- end }}

{{/*
The outboxd container, as one item of a pod's containers list. Use it in
your own pod template:
  containers:
    - name: my-service
      ...
    {{- include "outboxd.container" (dict "Values" .Values.outboxd "Release" .Release) | nindent 4 }}
with the volumes from "outboxd.volumes" and a terminationGracePeriodSeconds
from "outboxd.terminationGracePeriodSeconds".
*/}}
{{- define "outboxd.container" -}}
{{- $secretName := include "outboxd.secretName" . -}}
- name: {{ .Values.containerName }}
  image: {{ include "outboxd.image" . | quote }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args: ["run", "--config", "/etc/outboxd/outboxd.yaml"]
  {{- with $secretName }}
  envFrom:
    - secretRef:
        name: {{ . }}
  {{- end }}
  env:
    # Probes and Prometheus reach the relay on all interfaces.
    - name: OUTBOXD__HTTP__LISTEN
      value: "0.0.0.0:{{ .Values.metrics.port }}"
    {{- with .Values.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: {{ .Values.metrics.portName }}
      containerPort: {{ .Values.metrics.port }}
      protocol: TCP
  volumeMounts:
    - name: outboxd-config
      mountPath: /etc/outboxd
      readOnly: true
    {{- with .Values.extraVolumeMounts }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  startupProbe:
    httpGet:
      path: /healthz
      port: {{ .Values.metrics.portName }}
    {{- toYaml .Values.probes.startup | nindent 4 }}
  livenessProbe:
    httpGet:
      path: /healthz
      port: {{ .Values.metrics.portName }}
    {{- toYaml .Values.probes.liveness | nindent 4 }}
  {{- if eq (include "outboxd.readinessEnabled" .) "true" }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: {{ .Values.metrics.portName }}
    {{- toYaml (omit .Values.probes.readiness "enabled") | nindent 4 }}
  {{- end }}
  {{- with .Values.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.securityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/* The pod volumes the outboxd container mounts, as list items. */}}
{{- define "outboxd.volumes" -}}
- name: outboxd-config
  configMap:
    name: {{ include "outboxd.fullname" . }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}
