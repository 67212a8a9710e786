{{/* Names and labels, defined once. */}}
{{- define "prosody-operator.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "prosody-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Chart-version labels stay out of pod templates, so a chart bump does not restart pods. */}}
{{- define "prosody-operator.labels" -}}
{{ include "prosody-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "prosody-operator.serviceAccountName" -}}
{{- default (include "prosody-operator.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{/* The Service the API server calls the webhook through. */}}
{{- define "prosody-operator.webhookServiceName" -}}
{{- printf "%s-webhook" (include "prosody-operator.fullname" . | trunc 55 | trimSuffix "-") -}}
{{- end -}}

{{/* The webhook certificate's Secret (cert-manager). */}}
{{- define "prosody-operator.webhookSecretName" -}}
{{- printf "%s-webhook-tls" (include "prosody-operator.fullname" . | trunc 51 | trimSuffix "-") -}}
{{- end -}}

{{- define "prosody-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "prosody-operator.sidecarImage" -}}
{{- printf "%s:%s" .Values.sidecar.image.repository (.Values.sidecar.image.tag | default .Chart.AppVersion) -}}
{{- end -}}
