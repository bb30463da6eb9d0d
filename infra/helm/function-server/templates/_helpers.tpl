{{- define "function-server.fullname" -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "function-server.selectorLabels" -}}
app.kubernetes.io/name: function-server
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "function-server.labels" -}}
{{ include "function-server.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | trunc 63 | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: metaflow-stack
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
metaflow-stack.io/function: {{ .Values.function | quote }}
{{- end -}}

{{/* The image's reference: its repository with its tag, its digest, or both (a pull pinned by digest). */}}
{{- define "function-server.image" -}}
{{- .Values.image.repository -}}
{{- with .Values.image.tag }}:{{ . }}{{ end -}}
{{- with .Values.image.digest }}@{{ . }}{{ end -}}
{{- end -}}
