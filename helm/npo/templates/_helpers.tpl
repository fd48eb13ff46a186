{{/* Names, labels, images and the endpoints every template shares. */}}

{{- define "npo.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* <release> when it already contains the chart name (the usual `npo`), else <release>-npo. */}}
{{- define "npo.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "npo.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "npo.selectorLabels" -}}
app.kubernetes.io/name: {{ include "npo.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "npo.labels" -}}
helm.sh/chart: {{ include "npo.chart" . }}
{{ include "npo.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: npo
{{- end -}}

{{/* Labels of one component: (dict "ctx" $ "component" "mlflow"). */}}
{{- define "npo.componentLabels" -}}
{{ include "npo.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "npo.componentSelector" -}}
{{ include "npo.selectorLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* repository:tag, or repository@digest when a digest is given. */}}
{{- define "npo.imageRef" -}}
{{- if .digest -}}
{{- printf "%s@%s" .repository .digest -}}
{{- else -}}
{{- printf "%s:%s" .repository (toString .tag) -}}
{{- end -}}
{{- end -}}

{{- define "npo.image" -}}
{{- include "npo.imageRef" .Values.image -}}
{{- end -}}

{{- define "npo.mlflowImage" -}}
{{- if .Values.mlflow.image.repository -}}
{{- include "npo.imageRef" .Values.mlflow.image -}}
{{- else -}}
{{- include "npo.image" . -}}
{{- end -}}
{{- end -}}

{{- define "npo.mlflowPullPolicy" -}}
{{- if .Values.mlflow.image.repository -}}
{{- .Values.mlflow.image.pullPolicy -}}
{{- else -}}
{{- .Values.image.pullPolicy -}}
{{- end -}}
{{- end -}}

{{- define "npo.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "npo.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* In-cluster DNS name of a Service of this release: <fullname>-<suffix>.<namespace>.svc */}}
{{- define "npo.serviceHost" -}}
{{- printf "%s-%s.%s.svc" (include "npo.fullname" .ctx) .suffix .ctx.Release.Namespace -}}
{{- end -}}

{{/* ---------------------------------------------------------------- object store */}}
{{- define "npo.s3.endpoint" -}}
{{- if eq .Values.s3.mode "internal" -}}
{{- printf "http://%s:8333" (include "npo.serviceHost" (dict "ctx" . "suffix" "seaweedfs")) -}}
{{- else -}}
{{- required "s3.external.endpoint is required when s3.mode=external" .Values.s3.external.endpoint | trimSuffix "/" -}}
{{- end -}}
{{- end -}}

{{/* The Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY that every pod reads. */}}
{{- define "npo.s3.secretName" -}}
{{- if .Values.s3.existingSecret -}}
{{- .Values.s3.existingSecret -}}
{{- else if eq .Values.s3.mode "external" -}}
{{- required "s3.existingSecret is required when s3.mode=external" .Values.s3.existingSecret -}}
{{- else -}}
{{- .Values.secretNames.s3 -}}
{{- end -}}
{{- end -}}

{{- define "npo.artifactsUri" -}}
{{- printf "s3://%s/%s" .Values.s3.bucket .Values.s3.artifactsPrefix -}}
{{- end -}}

{{- define "npo.mlflowArtifactsUri" -}}
{{- printf "s3://%s/%s" .Values.s3.bucket .Values.s3.mlflowPrefix -}}
{{- end -}}

{{/* ---------------------------------------------------------------- PostgreSQL */}}
{{- define "npo.postgres.host" -}}
{{- include "npo.serviceHost" (dict "ctx" . "suffix" "postgresql") -}}
{{- end -}}

{{/* Internal mode: the Secret holding the generated password (key `password`). */}}
{{- define "npo.postgres.credentialsSecret" -}}
{{- printf "%s-postgresql" (include "npo.fullname" .) -}}
{{- end -}}

{{/* The Secret with NPO_METADATA_URL, and its key. */}}
{{- define "npo.metadataDb.secretName" -}}
{{- if eq .Values.postgres.mode "external" -}}
{{- required "postgres.external.existingSecret is required when postgres.mode=external" .Values.postgres.external.existingSecret -}}
{{- else -}}
{{- .Values.secretNames.metadataDb -}}
{{- end -}}
{{- end -}}

{{- define "npo.metadataDb.key" -}}
{{- if eq .Values.postgres.mode "external" -}}
{{- .Values.postgres.external.metadataUrlKey -}}
{{- else -}}
NPO_METADATA_URL
{{- end -}}
{{- end -}}

{{/* The Secret with MLflow's backend store URL, and its key. */}}
{{- define "npo.mlflowDb.secretName" -}}
{{- if eq .Values.postgres.mode "external" -}}
{{- include "npo.metadataDb.secretName" . -}}
{{- else -}}
{{- printf "%s-mlflow-db" (include "npo.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "npo.mlflowDb.key" -}}
{{- if eq .Values.postgres.mode "external" -}}
{{- .Values.postgres.external.mlflowUrlKey -}}
{{- else -}}
MLFLOW_BACKEND_STORE_URI
{{- end -}}
{{- end -}}

{{/* ---------------------------------------------------------------- MLflow */}}
{{- define "npo.mlflow.host" -}}
{{- include "npo.serviceHost" (dict "ctx" . "suffix" "mlflow") -}}
{{- end -}}

{{- define "npo.mlflow.url" -}}
{{- printf "http://%s:%v" (include "npo.mlflow.host" .) .Values.mlflow.port -}}
{{- end -}}

{{- define "npo.mlflow.secretName" -}}
{{- default .Values.secretNames.mlflow .Values.mlflow.existingSecret -}}
{{- end -}}

{{/* Kept across `helm uninstall` (credentials, data) when retainOnUninstall is set. */}}
{{- define "npo.retain" -}}
{{- if .Values.retainOnUninstall -}}
helm.sh/resource-policy: keep
{{- end -}}
{{- end -}}

{{/* A PVC's storageClassName line: "" = omitted (default class), "-" = "" (no class). */}}
{{- define "npo.storageClass" -}}
{{- if eq . "-" -}}
storageClassName: ""
{{- else if . -}}
storageClassName: {{ . | quote }}
{{- end -}}
{{- end -}}

{{/* Plain environment of the project-image pods (read-only root: caches go to /tmp). */}}
{{- define "npo.tmpEnv" -}}
- name: HOME
  value: /tmp
- name: TMPDIR
  value: /tmp
- name: MPLCONFIGDIR
  value: /tmp/matplotlib
- name: PYTHONDONTWRITEBYTECODE
  value: "1"
- name: PYTHONUNBUFFERED
  value: "1"
{{- end -}}

{{/* S3 endpoint and keys, as the npo S3 client and boto3 read them. */}}
{{- define "npo.s3Env" -}}
- name: AWS_ENDPOINT_URL
  value: {{ include "npo.s3.endpoint" . | quote }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ include "npo.s3.secretName" . }}
      key: AWS_ACCESS_KEY_ID
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "npo.s3.secretName" . }}
      key: AWS_SECRET_ACCESS_KEY
{{- if .Values.s3.region }}
- name: AWS_REGION
  value: {{ .Values.s3.region | quote }}
- name: AWS_DEFAULT_REGION  # the name boto3 (MLflow's S3 client) reads
  value: {{ .Values.s3.region | quote }}
{{- end }}
{{- end -}}
