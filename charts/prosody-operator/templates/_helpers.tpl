{{/* Names and labels, defined once. */}}
{{- define "prosody-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "prosody-operator.fullname" -}}
{{- $name := include "prosody-operator.name" . -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "prosody-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "prosody-operator.name" . }}
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

{{/* With serviceAccount.create=false, serviceaccount.yaml fails unless serviceAccount.name is set. */}}
{{- define "prosody-operator.serviceAccountName" -}}
{{- default (include "prosody-operator.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{/* The Service the API server calls the webhook through. */}}
{{- define "prosody-operator.webhookServiceName" -}}
{{- printf "%s-webhook" (include "prosody-operator.fullname" . | trunc 55 | trimSuffix "-") -}}
{{- end -}}

{{/* The Service of the operator's own metrics. */}}
{{- define "prosody-operator.metricsServiceName" -}}
{{- printf "%s-metrics" (include "prosody-operator.fullname" . | trunc 55 | trimSuffix "-") -}}
{{- end -}}

{{/* The webhook certificate's Secret (cert-manager's, or the replicas' shared one). */}}
{{- define "prosody-operator.webhookSecretName" -}}
{{- printf "%s-webhook-tls" (include "prosody-operator.fullname" . | trunc 51 | trimSuffix "-") -}}
{{- end -}}

{{/*
An image reference: repository:tag, its registry replaced by global.imageRegistry when that is
set. The registry is the first path component when it has a "." or ":" or is "localhost" (the
rule container runtimes use); a repository without one (Docker Hub) gets the registry prefixed.
*/}}
{{- define "prosody-operator.imageReference" -}}
{{- $repository := .image.repository -}}
{{- with .root.Values.global.imageRegistry -}}
{{- $parts := splitList "/" $repository -}}
{{- $first := first $parts -}}
{{- if and (gt (len $parts) 1) (or (contains "." $first) (contains ":" $first) (eq $first "localhost")) -}}
{{- $repository = rest $parts | join "/" -}}
{{- end -}}
{{- $repository = printf "%s/%s" (trimSuffix "/" .) $repository -}}
{{- end -}}
{{- printf "%s:%s" $repository (.image.tag | default .root.Chart.AppVersion) -}}
{{- end -}}

{{- define "prosody-operator.image" -}}
{{- include "prosody-operator.imageReference" (dict "image" .Values.image "root" .) -}}
{{- end -}}

{{- define "prosody-operator.sidecarImage" -}}
{{- include "prosody-operator.imageReference" (dict "image" .Values.sidecar.image "root" .) -}}
{{- end -}}

{{/*
A securityContext (pod or container) as YAML. On OpenShift (the API server serves
security.openshift.io/v1), or always with adaptSecurityContext=force, runAsUser, runAsGroup and
fsGroup are left out: the restricted SCC assigns them from the namespace's range and refuses
others. runAsNonRoot stays, and the image's numeric USER satisfies it elsewhere.
*/}}
{{- define "prosody-operator.securityContext" -}}
{{- $context := .context -}}
{{- $mode := dig "compatibility" "openshift" "adaptSecurityContext" "auto" .root.Values.global -}}
{{- $openshift := .root.Capabilities.APIVersions.Has "security.openshift.io/v1" -}}
{{- if or (eq $mode "force") (and (eq $mode "auto") $openshift) -}}
{{- $context = omit $context "runAsUser" "runAsGroup" "fsGroup" -}}
{{- end -}}
{{- with $context -}}
{{- toYaml . -}}
{{- end -}}
{{- end -}}
