{{- define "key-release.fullname" -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "key-release.selectorLabels" -}}
app.kubernetes.io/name: key-release
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "key-release.labels" -}}
{{ include "key-release.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | trunc 63 | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: metaflow-stack
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "key-release.policies" -}}
{{- .Values.policies.existingConfigMap | default (printf "%s-policies" (include "key-release.fullname" .)) -}}
{{- end -}}

{{/* The image's reference: its repository with its tag, its digest, or both (a pull pinned by digest). */}}
{{- define "key-release.image" -}}
{{- .Values.image.repository -}}
{{- with .Values.image.tag }}:{{ . }}{{ end -}}
{{- with .Values.image.digest }}@{{ . }}{{ end -}}
{{- end -}}
