{{/*
Chart name, shortened to a DNS label.
*/}}
{{- define "vault-registrar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's resources: "<release>-<chart>", or the release name alone when it
already contains the chart name.
*/}}
{{- define "vault-registrar.fullname" -}}
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

{{/*
Value of the helm.sh/chart label.
*/}}
{{- define "vault-registrar.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels the Deployment selects its pods by. Never change these on upgrade.
*/}}
{{- define "vault-registrar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vault-registrar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Labels on every resource of the release.
*/}}
{{- define "vault-registrar.labels" -}}
helm.sh/chart: {{ include "vault-registrar.chart" . }}
{{ include "vault-registrar.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: vault-registrar
{{- end }}

{{/*
Name of the ServiceAccount the operator runs as.
*/}}
{{- define "vault-registrar.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "vault-registrar.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Name of the leader-election Lease, and of the Role that grants access to it.
*/}}
{{- define "vault-registrar.leaseName" -}}
{{- include "vault-registrar.fullname" . }}
{{- end }}

{{/*
The image reference; the tag defaults to the chart's appVersion.
*/}}
{{- define "vault-registrar.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
The API access the operator needs to reconcile VaultClusters. The same rules go into the
ClusterRole (all namespaces) or into one Role per watched namespace.
*/}}
{{- define "vault-registrar.rules" -}}
- apiGroups: ["vault-registrar.dev"]
  resources: ["vaultclusters"]
  verbs: ["list", "watch", "patch"]
- apiGroups: ["vault-registrar.dev"]
  resources: ["vaultclusters/status"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch", "patch"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# CA bundles referenced by spec.health.tls.caConfigMapRef. Secrets (caSecretRef) are
# readable only in the namespaces listed in tls.secretNamespaces (ca-secret-roles.yaml).
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
# Watched (ours only, by label): before a promotion, wait until the active Service no
# longer lists the demoted pod.
- apiGroups: ["discovery.k8s.io"]
  resources: ["endpointslices"]
  verbs: ["list", "watch"]
# spec.upgrade (opt-in): the pods' StatefulSet and its update revision, watched; outdated
# pods replaced through the Eviction API, so PodDisruptionBudgets apply. Never a delete.
- apiGroups: ["apps"]
  resources: ["statefulsets"]
  verbs: ["list", "watch"]
- apiGroups: [""]
  resources: ["pods/eviction"]
  verbs: ["create"]
{{- end }}

{{/*
Refuses value combinations that would render a broken or unsafe release.
*/}}
{{- define "vault-registrar.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.leaderElection.enabled) }}
{{- fail "replicaCount > 1 needs leaderElection.enabled=true, otherwise every replica writes labels and Services" }}
{{- end }}
{{- if and .Values.serviceMonitor.enabled (not .Values.metrics.service.enabled) }}
{{- fail "serviceMonitor.enabled=true needs metrics.service.enabled=true" }}
{{- end }}
{{- if .Values.serviceMonitor.enabled }}
{{- $interval := include "vault-registrar.milliseconds" .Values.serviceMonitor.interval | int64 }}
{{- $timeout := include "vault-registrar.milliseconds" .Values.serviceMonitor.scrapeTimeout | int64 }}
{{- if gt $timeout $interval }}
{{- fail (printf "serviceMonitor.scrapeTimeout (%s) is longer than serviceMonitor.interval (%s): the Prometheus Operator refuses such a scrape" .Values.serviceMonitor.scrapeTimeout .Values.serviceMonitor.interval) }}
{{- end }}
{{- end }}
{{- if ne (len .Values.watchNamespaces) (len (uniq .Values.watchNamespaces)) }}
{{- fail "watchNamespaces lists a namespace more than once" }}
{{- end }}
{{- end }}

{{/*
PromQL label matchers selecting this release's metrics: the ServiceMonitor's job unless
prometheusRule.selector says otherwise.
*/}}
{{- define "vault-registrar.metricsSelector" -}}
{{- default (printf "job=%q" (printf "%s-metrics" (include "vault-registrar.fullname" .))) .Values.prometheusRule.selector }}
{{- end }}

{{/*
Milliseconds in a Prometheus duration (the schema has checked its form, e.g. 1m30s).
*/}}
{{- define "vault-registrar.milliseconds" -}}
{{- $unit := dict "y" 31536000000 "w" 604800000 "d" 86400000 "h" 3600000 "m" 60000 "s" 1000 "ms" 1 }}
{{- $total := 0 }}
{{- range regexFindAll "[0-9]+(ms|[ywdhms])" . -1 }}
{{- $total = add $total (mul (regexFind "^[0-9]+" . | int64) (get $unit (regexReplaceAll "^[0-9]+" . ""))) }}
{{- end }}
{{- $total }}
{{- end }}
