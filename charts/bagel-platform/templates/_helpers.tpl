{{/* Chart name, truncated to 63 characters. */}}
{{- define "bagel.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name prefix of namespaced resources. */}}
{{- define "bagel.fullname" -}}
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

{{/* Labels of every resource. */}}
{{- define "bagel.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "bagel.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The training image reference. */}}
{{- define "bagel.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Storage environment: endpoint and region as values, credentials from the existing Secret only. */}}
{{- define "bagel.storageEnv" -}}
- name: AWS_DEFAULT_REGION
  value: {{ .Values.storage.region | quote }}
{{- if .Values.storage.endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ .Values.storage.endpoint | quote }}
- name: S3_ENDPOINT
  value: {{ .Values.storage.endpoint | quote }}
- name: FSSPEC_S3_ENDPOINT_URL
  value: {{ .Values.storage.endpoint | quote }}
{{- end }}
{{- if .Values.storage.existingSecret }}
{{- range .Values.storage.secretKeys }}
- name: {{ . }}
  valueFrom:
    secretKeyRef:
      name: {{ $.Values.storage.existingSecret }}
      key: {{ . }}
{{- end }}
{{- end }}
{{- end }}
