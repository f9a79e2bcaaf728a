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

{{/* The selector labels as `key=value,key=value`, as the operator's --operator-pod-labels reads them. */}}
{{- define "sharddb-operator.selectorLabelList" -}}
{{- printf "app.kubernetes.io/name=%s,app.kubernetes.io/instance=%s" (include "sharddb-operator.name" .) .Release.Name }}
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

{{- /*
What the operator may do, and why. The same rules are granted either cluster-wide (a ClusterRole,
the default) or in each namespace of rbac.namespaces (a Role there).
*/ -}}
{{- define "sharddb-operator.rules" -}}
# ShardedDatabases: watch them (the controller), patch them (server-side apply of nothing but
# metadata), and update them: the admin endpoint replaces the spec at the resourceVersion it read
# for /add and /rm.
- apiGroups: [sharddb.io]
  resources: [shardeddatabases]
  verbs: [get, list, watch, patch, update]
# The status: conditions, ready servers, per-shard primaries, the topology epoch.
- apiGroups: [sharddb.io]
  resources: [shardeddatabases/status]
  verbs: [get, patch, update]
- apiGroups: [sharddb.io]
  resources: [shardeddatabases/scale]
  verbs: [get]
# Owner references with blockOwnerDeletion need update on the owner's finalizers.
- apiGroups: [sharddb.io]
  resources: [shardeddatabases/finalizers]
  verbs: [update]
# Each server's StatefulSet and the routers' Deployment: created, kept as built, deleted once a
# server has been drained.
- apiGroups: [apps]
  resources: [statefulsets, deployments]
  verbs: [get, list, watch, create, update, patch, delete]
# The headless and router Services; the topology ConfigMap (replaced at a resourceVersion, so
# update); the Secrets of each database (Postgres credentials, its CA, every component's
# certificate, the admin token) and, in the release namespace, the operator's own CA; the pods'
# ServiceAccounts.
- apiGroups: [""]
  resources: [services, configmaps, secrets, serviceaccounts]
  verbs: [get, list, watch, create, update, patch, delete]
# The Role and RoleBinding letting server and router pods read their topology ConfigMap. Granting
# them needs the ConfigMap permissions above (RBAC forbids granting what one does not hold).
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [get, list, watch, create, update, patch, delete]
# At most one server and one router down at a time during drains.
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, watch, create, update, patch, delete]
# Each database's NetworkPolicy closing its servers to all but its own components.
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, list, watch, create, update, patch, delete]
# Server pods: listed to see which run an older revision of their StatefulSet, and evicted one
# at a time by the rolling restart (the eviction API, so PodDisruptionBudgets hold). Nothing on
# volumes: the operator leaves them (persistentVolumeClaimRetentionPolicy: Retain) for people to
# delete.
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [pods/eviction]
  verbs: [create]
# Events on the ShardedDatabase (Ready, Demoted, Promoted, ReplicaReady, ...).
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end }}
