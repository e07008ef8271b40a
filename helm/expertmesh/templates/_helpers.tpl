{{/* Names, labels and the pieces every workload shares. */}}

{{- define "expertmesh.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "expertmesh.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: expertmesh
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component: (dict "ctx" $ "component" "gateway"). */}}
{{- define "expertmesh.selector" -}}
app.kubernetes.io/name: {{ .ctx.Chart.Name }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "expertmesh.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* etcd client URLs, comma separated. */}}
{{- define "expertmesh.etcdEndpoints" -}}
{{- if .Values.etcd.enabled -}}
{{- $name := include "expertmesh.fullname" . -}}
{{- $urls := list -}}
{{- range $i := until (int .Values.etcd.replicas) -}}
{{- $urls = append $urls (printf "http://%s-etcd-%d.%s-etcd-headless.%s.svc:2379" $name $i $name $.Release.Namespace) -}}
{{- end -}}
{{- join "," $urls -}}
{{- else -}}
{{- if not .Values.etcd.external.endpoints -}}
{{- fail "etcd: enable the bundled etcd (etcd.enabled) or list etcd.external.endpoints" -}}
{{- end -}}
{{- join "," .Values.etcd.external.endpoints -}}
{{- end -}}
{{- end -}}

{{/* Flags naming the model: a checkpoint folder or a generated preset. */}}
{{- define "expertmesh.modelArgs" -}}
{{- if .Values.model.path }}
- --model={{ .Values.model.storage.mountPath }}/{{ .Values.model.path }}
{{- else }}
- --preset={{ .Values.model.preset }}
- --seed={{ .Values.model.seed }}
- --vocab-size={{ .Values.model.vocabSize }}
{{- end }}
{{- end -}}

{{/* Environment every cluster process shares (registry, logs, traces, topology). */}}
{{- define "expertmesh.commonEnv" -}}
- name: EXPERTMESH_ETCD
  value: {{ include "expertmesh.etcdEndpoints" . | quote }}
- name: EXPERTMESH_ETCD_PREFIX
  value: {{ .Values.etcd.prefix | quote }}
- name: EXPERTMESH_LEASE_TTL
  value: {{ .Values.etcd.leaseTtlSeconds | quote }}
{{- with .Values.etcd.auth.existingSecret }}
- name: EXPERTMESH_ETCD_USER
  valueFrom: {secretKeyRef: {name: {{ . }}, key: username}}
- name: EXPERTMESH_ETCD_PASSWORD
  valueFrom: {secretKeyRef: {name: {{ . }}, key: password}}
{{- end }}
{{- if and (not .Values.etcd.enabled) .Values.etcd.external.tls.existingSecret }}
- name: EXPERTMESH_ETCD_CA
  value: /etc/expertmesh/etcd-tls/ca.crt
{{- if .Values.etcd.external.tls.clientCertificate }}
- name: EXPERTMESH_ETCD_CERT
  value: /etc/expertmesh/etcd-tls/tls.crt
- name: EXPERTMESH_ETCD_KEY
  value: /etc/expertmesh/etcd-tls/tls.key
{{- end }}
{{- end }}
- name: EXPERTMESH_LOG_FORMAT
  value: {{ .Values.logging.format | quote }}
- name: RUST_LOG
  value: {{ .Values.logging.level | quote }}
{{- with .Values.otlp.endpoint }}
- name: EXPERTMESH_OTLP_ENDPOINT
  value: {{ . | quote }}
{{- end }}
- name: POD_IP
  valueFrom: {fieldRef: {fieldPath: status.podIP}}
- name: EXPERTMESH_NODE
  valueFrom: {fieldRef: {fieldPath: spec.nodeName}}
- name: EXPERTMESH_WORKER_ID
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
{{- end -}}

{{- define "expertmesh.volumes" -}}
{{- $s := .Values.model.storage -}}
{{- if eq $s.type "pvc" }}
- name: models
  persistentVolumeClaim:
    claimName: {{ default (printf "%s-models" (include "expertmesh.fullname" .)) $s.pvc.claimName }}
    readOnly: true
{{- else if eq $s.type "hostPath" }}
- name: models
  hostPath:
    path: {{ $s.hostPath.path }}
    type: Directory
{{- end }}
- name: tmp
  emptyDir: {}
{{- if and (not .Values.etcd.enabled) .Values.etcd.external.tls.existingSecret }}
- name: etcd-tls
  secret:
    secretName: {{ .Values.etcd.external.tls.existingSecret }}
{{- end }}
{{- end -}}

{{- define "expertmesh.volumeMounts" -}}
{{- if ne .Values.model.storage.type "none" }}
- name: models
  mountPath: {{ .Values.model.storage.mountPath }}
  readOnly: true
{{- end }}
- name: tmp
  mountPath: /tmp
{{- if and (not .Values.etcd.enabled) .Values.etcd.external.tls.existingSecret }}
- name: etcd-tls
  mountPath: /etc/expertmesh/etcd-tls
  readOnly: true
{{- end }}
{{- end -}}

{{/* Resources with `devices` accelerators added to requests and limits. */}}
{{- define "expertmesh.resources" -}}
{{- $r := deepCopy (default dict .resources) -}}
{{- if and .devices .ctx.Values.accelerator.resourceName -}}
{{- $_ := set $r "requests" (merge (dict .ctx.Values.accelerator.resourceName (int .devices)) (default dict $r.requests)) -}}
{{- $_ := set $r "limits" (merge (dict .ctx.Values.accelerator.resourceName (int .devices)) (default dict $r.limits)) -}}
{{- end -}}
{{- toYaml $r -}}
{{- end -}}

{{/* Probes on a worker's HTTP side port. */}}
{{- define "expertmesh.workerProbes" -}}
readinessProbe:
  httpGet: {path: /ready, port: metrics}
  periodSeconds: 5
  failureThreshold: 2
livenessProbe:
  httpGet: {path: /health, port: metrics}
  periodSeconds: 10
  failureThreshold: 6
startupProbe:
  httpGet: {path: /health, port: metrics}
  periodSeconds: 5
  failureThreshold: 360
{{- end -}}

{{/*
The expert shard groups after `split`, validated: a JSON list of
{name, from, to, replicas, devices, superpod, resources, nodeSelector, tolerations, affinity}.
Fails on an empty list, an expert id outside the model, a range upside down, an expert held by
no group, and groups sharing experts without `extraReplica: true`.
*/}}
{{- define "expertmesh.expertGroups" -}}
{{- $n := int .Values.model.routedExperts -}}
{{- if not .Values.expertShards -}}
{{- fail "expertShards: at least one shard group is required (every expert must be held)" -}}
{{- end -}}
{{- $groups := list -}}
{{- range $g := .Values.expertShards -}}
{{- $from := int $g.experts.from -}}
{{- $to := int $g.experts.to -}}
{{- if gt $from $to -}}
{{- fail (printf "expertShards[%s].experts: from %d is after to %d" $g.name $from $to) -}}
{{- end -}}
{{- if ge $to $n -}}
{{- fail (printf "expertShards[%s].experts: expert %d is out of range (model.routedExperts is %d, ids 0-%d)" $g.name $to $n (sub $n 1)) -}}
{{- end -}}
{{- $count := add (sub $to $from) 1 -}}
{{- $split := int (default 1 $g.split) -}}
{{- if and $g.node (gt (int (default 1 $g.replicas)) 1) -}}
{{- fail (printf "expertShards[%s]: replicas on one node (%s) do not survive its loss; drop node or replicas" $g.name $g.node) -}}
{{- end -}}
{{- if gt $split (int $count) -}}
{{- fail (printf "expertShards[%s].split: %d groups for %d experts" $g.name $split $count) -}}
{{- end -}}
{{- range $i := until $split -}}
{{- $start := add $from (div (mul $i $count) $split) -}}
{{- $end := sub (add $from (div (mul (add $i 1) $count) $split)) 1 -}}
{{- $name := ternary $g.name (printf "%s-%d" $g.name $i) (eq $split 1) -}}
{{- $groups = append $groups (dict "name" $name "from" $start "to" $end "replicas" (int (default 1 $g.replicas)) "devices" (int (default 0 $g.devices)) "superpod" (default "" $g.superpod) "node" (default "" $g.node) "extraReplica" (default false $g.extraReplica) "resources" (default dict $g.resources) "nodeSelector" (default dict $g.nodeSelector) "tolerations" (default list $g.tolerations) "affinity" (default dict $g.affinity)) -}}
{{- end -}}
{{- end -}}
{{- range $i, $a := $groups -}}
{{- range $j, $b := $groups -}}
{{- if and (lt $i $j) (le (int $a.from) (int $b.to)) (le (int $b.from) (int $a.to)) (not (or $a.extraReplica $b.extraReplica)) -}}
{{- fail (printf "expertShards: %s (experts %d-%d) and %s (experts %d-%d) overlap; set extraReplica: true on the group that adds replicas, or use replicas for redundancy" $a.name (int $a.from) (int $a.to) $b.name (int $b.from) (int $b.to)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- range $e := until $n -}}
{{- $held := false -}}
{{- range $g := $groups -}}
{{- if and (le (int $g.from) $e) (le $e (int $g.to)) -}}{{- $held = true -}}{{- end -}}
{{- end -}}
{{- if not $held -}}
{{- fail (printf "expertShards: expert %d is held by no shard group (model.routedExperts is %d)" $e $n) -}}
{{- end -}}
{{- end -}}
{{- toJson $groups -}}
{{- end -}}
