{{- define "worker-pool.fullname" -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "worker-pool.selectorLabels" -}}
app.kubernetes.io/name: worker-pool
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "worker-pool.labels" -}}
{{ include "worker-pool.selectorLabels" . }}
app.kubernetes.io/version: {{ regexReplaceAll "[^A-Za-z0-9._-]" .Values.image.tag "-" | trunc 63 | trimAll "-._" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: metaflow-stack
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "worker-pool.redisSecret" -}}
{{- .Values.redis.existingSecret | default (printf "%s-redis" (include "worker-pool.fullname" .)) -}}
{{- end -}}

{{/* The image's reference: its repository with its tag, its digest, or both (a pull pinned by digest). */}}
{{- define "worker-pool.image" -}}
{{- .Values.image.repository -}}
{{- with .Values.image.tag }}:{{ . }}{{ end -}}
{{- with .Values.image.digest }}@{{ . }}{{ end -}}
{{- end -}}
