{{/* The chart's name. */}}
{{- define "sharddb-operator.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name: the release name, suffixed by the chart name unless it holds it. */}}
{{- define "sharddb-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "sharddb-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sharddb-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "sharddb-operator.labels" -}}
{{ include "sharddb-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: sharddb
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

{{- define "sharddb-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sharddb-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image of one sharddb binary: (list $ "sharddb-router") → ghcr.io/sharddb/sharddb-router:0.1.0 */}}
{{- define "sharddb-operator.image" -}}
{{- $root := index . 0 -}}
{{- printf "%s/%s:%s" $root.Values.images.registry (index . 1) (default $root.Chart.AppVersion $root.Values.images.tag) }}
{{- end }}

{{- define "sharddb-operator.leaseName" -}}
{{- default (include "sharddb-operator.fullname" .) .Values.leaderElection.leaseName }}
{{- end }}
