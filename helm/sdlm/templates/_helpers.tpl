{{/* The release's base name, at most 52 characters so that suffixed names fit in 63. */}}
{{- define "sdlm.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels of every object; "component" is passed as .component. */}}
{{- define "sdlm.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
{{ include "sdlm.selectorLabels" . }}
{{- end -}}

{{- define "sdlm.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "sdlm.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "sdlm.cudaImage" -}}
{{- printf "%s:%s" .Values.cudaImage.repository (default .Chart.AppVersion .Values.cudaImage.tag) -}}
{{- end -}}

{{/* etcd client URLs, comma-separated. */}}
{{- define "sdlm.etcdEndpoints" -}}
{{- if .Values.etcd.bundled -}}
{{- $name := printf "%s-etcd" (include "sdlm.fullname" .) -}}
{{- $urls := list -}}
{{- range $i := until (int .Values.etcd.replicas) -}}
{{- $urls = append $urls (printf "http://%s-%d.%s.%s.svc:2379" $name $i $name $.Release.Namespace) -}}
{{- end -}}
{{- join "," $urls -}}
{{- else -}}
{{- required "etcd.endpoints is required when etcd.bundled is false" (join "," .Values.etcd.endpoints) -}}
{{- end -}}
{{- end -}}

{{/* gRPC health probes (grpc.health.v1 on the service port); .startup is the startup budget in
periods; .ready, when set, is the service whose health readiness checks (the gateway reports
sdlm.v1.Generation serving only while it knows a scheduler leader), while liveness checks the
server itself. */}}
{{- define "sdlm.probes" -}}
startupProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: 5
  failureThreshold: {{ .startup }}
readinessProbe:
  grpc:
    port: {{ .port }}
    {{- with .ready }}
    service: {{ . }}
    {{- end }}
  periodSeconds: 5
  failureThreshold: 2
livenessProbe:
  grpc:
    port: {{ .port }}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 3
{{- end -}}

{{/* The pod-level security settings shared by the sdlm containers. */}}
{{- define "sdlm.securityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 65532
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* A PodDisruptionBudget for .component with .pdb (minAvailable or maxUnavailable). */}}
{{- define "sdlm.pdb" -}}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "sdlm.fullname" .root }}-{{ .component }}
  labels:
    {{- include "sdlm.labels" . | nindent 4 }}
spec:
  {{- if hasKey .pdb "minAvailable" }}
  minAvailable: {{ .pdb.minAvailable }}
  {{- else }}
  maxUnavailable: {{ .pdb.maxUnavailable }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "sdlm.selectorLabels" . | nindent 6 }}
{{- end -}}

{{/* Ingress rule peers: pods of the release's .component. */}}
{{- define "sdlm.fromComponent" -}}
- podSelector:
    matchLabels:
      app.kubernetes.io/name: {{ .root.Chart.Name }}
      app.kubernetes.io/instance: {{ .root.Release.Name }}
      app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The metrics port, open to values.networkPolicy.metricsFrom. */}}
{{- define "sdlm.metricsIngress" -}}
- ports:
    - port: metrics
  {{- with .Values.networkPolicy.metricsFrom }}
  from:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
