{{- define "metadata-service.fullname" -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "metadata-service.selectorLabels" -}}
app.kubernetes.io/name: metadata-service
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "metadata-service.labels" -}}
{{ include "metadata-service.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | trunc 63 | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: metaflow-stack
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* SQLite (no database Secret) keeps one file on one volume: one replica, replaced not rolled. */}}
{{- define "metadata-service.sqlite" -}}
{{- if not .Values.database.existingSecret -}}true{{- end -}}
{{- end -}}

{{/* The image's reference: its repository with its tag, its digest, or both (a pull pinned by digest). */}}
{{- define "metadata-service.image" -}}
{{- .Values.image.repository -}}
{{- with .Values.image.tag }}:{{ . }}{{ end -}}
{{- with .Values.image.digest }}@{{ . }}{{ end -}}
{{- end -}}
