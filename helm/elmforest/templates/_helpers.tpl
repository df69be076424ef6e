{{/* Names and labels shared by every template. */}}
{{- define "elmforest.name" -}}
{{- .Chart.Name -}}
{{- end }}

{{- define "elmforest.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end }}

{{- define "elmforest.selectorLabels" -}}
app.kubernetes.io/name: {{ include "elmforest.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "elmforest.labels" -}}
{{ include "elmforest.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "elmforest.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "elmforest.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end }}

{{/* The operator image, by digest: a tag can move, a digest cannot. */}}
{{- define "elmforest.image" -}}
{{- $digest := required "image.digest is required: pin the operator image by digest (--set image.digest=sha256:<64 hex>)" .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository $digest -}}
{{- end }}
