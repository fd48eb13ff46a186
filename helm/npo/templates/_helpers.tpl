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

{{/* The service account of the pipeline steps (ClusterConfig.service_account's default). */}}
{{- define "npo.pipelineServiceAccountName" -}}
{{- .Values.pipeline.serviceAccount.name -}}
{{- end -}}

{{/* The labels every pipeline step's pod carries (npo.pipelines.kubernetes.POD_LABELS). */}}
{{- define "npo.pipelinePodLabels" -}}
app.kubernetes.io/part-of: npo
app.kubernetes.io/component: pipeline-step
{{- end -}}

{{/*
Whether `lookup` sees the cluster: a live list always has `items` (possibly empty), while
helm template / lint / --dry-run=client answer every lookup with an empty map. Listing the
release namespace's Secrets needs no right that Helm's own release storage does not.
*/}}
{{- define "npo.live" -}}
{{- if hasKey (lookup "v1" "Secret" .Release.Namespace "") "items" -}}true{{- end -}}
{{- end -}}

{{/* Refuse a render that would draw new credentials without seeing the cluster:
(dict "ctx" $ "what" (list "S3 keys" ...) "fix" (list "s3.existingSecret" ...)). */}}
{{- define "npo.refuseOfflineGeneration" -}}
{{- if and .what (eq .ctx.Values.credentials.offlineGeneration "fail") (not (include "npo.live" .ctx)) -}}
{{- fail (printf "this render cannot see the cluster (helm template, lint, --dry-run=client, a GitOps tool), so it would generate new %s, and applying it would replace the ones the data was created with. Set %s to Secrets you manage (docs/deploy.md, section Credentials), or --set credentials.offlineGeneration=generate for a throwaway install or a look at the manifests" (join " and " .what) (join " and " .fix)) -}}
{{- end -}}
{{- end -}}

{{/* With requireDigests, fail unless every image this release runs is pinned by digest. */}}
{{- define "npo.checkDigests" -}}
{{- if .Values.requireDigests -}}
{{- $missing := list -}}
{{- if not .Values.image.digest -}}
{{- $missing = append $missing (printf "image.digest (%s:%s)" .Values.image.repository (toString .Values.image.tag)) -}}
{{- end -}}
{{- if and .Values.mlflow.enabled .Values.mlflow.image.repository (not .Values.mlflow.image.digest) -}}
{{- $missing = append $missing (printf "mlflow.image.digest (%s)" .Values.mlflow.image.repository) -}}
{{- end -}}
{{- if and (eq .Values.s3.mode "internal") (not .Values.s3.internal.image.digest) -}}
{{- $missing = append $missing (printf "s3.internal.image.digest (%s:%s)" .Values.s3.internal.image.repository (toString .Values.s3.internal.image.tag)) -}}
{{- end -}}
{{- if and (eq .Values.postgres.mode "internal") (not .Values.postgres.internal.image.digest) -}}
{{- $missing = append $missing (printf "postgres.internal.image.digest (%s:%s)" .Values.postgres.internal.image.repository (toString .Values.postgres.internal.image.tag)) -}}
{{- end -}}
{{- if $missing -}}
{{- fail (printf "requireDigests is true but these images have no digest: %s. Set each to the sha256:<64 hex> of the image you tested (e.g. `docker buildx imagetools inspect REPOSITORY:TAG`)" (join ", " $missing)) -}}
{{- end -}}
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

{{/* Internal mode: the Secret with the server's passwords (postgres-password, app-password,
mlflow-password): generated, or postgres.internal.existingSecret. */}}
{{- define "npo.postgres.credentialsSecret" -}}
{{- default (printf "%s-postgresql" (include "npo.fullname" .)) .Values.postgres.internal.existingSecret -}}
{{- end -}}

{{/* The Secret with NPO_METADATA_URL, and its key. */}}
{{- define "npo.metadataDb.secretName" -}}
{{- if eq .Values.postgres.mode "external" -}}
{{- required "postgres.external.existingSecret is required when postgres.mode=external" .Values.postgres.external.existingSecret -}}
{{- else -}}
{{- default .Values.secretNames.metadataDb .Values.postgres.internal.existingSecret -}}
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
{{- default (printf "%s-mlflow-db" (include "npo.fullname" .)) .Values.postgres.internal.existingSecret -}}
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

{{/* The ConfigMap data of MLflow's schema upgrade (templates/mlflow.yaml says why). */}}
{{- define "npo.mlflowDbUpgradeScript" -}}
mlflow_db_upgrade.py: |
  """`mlflow db upgrade` of MLFLOW_BACKEND_STORE_URI, one writer at a time.

  Run by the MLflow pods' initContainer (before the server starts) and by the init Job. It
  waits for the database, takes a PostgreSQL advisory lock (held by its session, so released
  if this process dies), then runs the `mlflow db upgrade` command's own code in this process,
  so the URL with its password is on no command line. The first holder creates or upgrades
  the schema; the others find it current.
  """

  import os
  import sys
  import time

  import sqlalchemy as sa

  LOCK_KEY = int.from_bytes(b"mlflowdb", "big")  # the same for every writer
  WAIT_S = float(os.environ.get("NPO_DB_WAIT_S", "600"))


  def connect(engine):
      deadline = time.monotonic() + WAIT_S
      while True:
          try:
              return engine.connect()
          except sa.exc.OperationalError as e:  # psycopg's text names host and user, no password
              if time.monotonic() > deadline:
                  sys.exit(f"mlflow db upgrade: no database after {WAIT_S:.0f} s: {e.orig}")
              print(f"mlflow db upgrade: waiting for the database: {e.orig}", flush=True)
              time.sleep(3)


  def main():
      from mlflow.db import upgrade

      url = os.environ["MLFLOW_BACKEND_STORE_URI"]
      engine = sa.create_engine(url)
      with connect(engine) as conn:
          locked = conn.dialect.name == "postgresql"
          if locked:
              print("mlflow db upgrade: waiting for the schema lock", flush=True)
              conn.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": LOCK_KEY})
              conn.commit()
          try:
              upgrade.callback(url)
          finally:
              if locked:
                  conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": LOCK_KEY})
                  conn.commit()
      engine.dispose()
      print("mlflow db upgrade: schema current", flush=True)


  if __name__ == "__main__":
      main()
{{- end -}}

{{/* The ConfigMap data of the SeaweedFS pod's S3 gateway (templates/seaweedfs.yaml says why). */}}
{{- define "npo.s3ProxyScript" -}}
s3_proxy.py: |
  """A TCP forwarder: the pod IP's S3 port to SeaweedFS's S3 gateway on 127.0.0.1.

  `weed server` binds its S3 gRPC port to the S3 HTTP address, and that gRPC service takes
  identity updates without credentials (the filer pushes them), so nothing of weed may
  listen beyond the pod's loopback. This process is the only listener on the pod IP: it
  passes bytes through unchanged (TLS-free HTTP, so S3 signatures still verify) and never
  parses them. NPO_PROXY_LISTEN=host:port (default 0.0.0.0:8333), NPO_PROXY_TARGET=host:port.
  """

  import asyncio
  import contextlib
  import os
  import signal

  CHUNK = 1 << 20


  def address(name, default):
      host, _, port = os.environ.get(name, default).rpartition(":")
      return host, int(port)


  LISTEN = address("NPO_PROXY_LISTEN", "0.0.0.0:8333")
  TARGET = address("NPO_PROXY_TARGET", "127.0.0.1:8334")


  async def pipe(reader, writer):
      try:
          while data := await reader.read(CHUNK):
              writer.write(data)
              await writer.drain()
          if writer.can_write_eof():
              writer.write_eof()  # pass the half-close on: the request is complete
      except OSError:
          writer.transport.abort()


  async def handle(client_reader, client_writer):
      try:
          server_reader, server_writer = await asyncio.open_connection(*TARGET)
      except OSError as e:
          print(f"s3 proxy: {TARGET[0]}:{TARGET[1]} unreachable: {e}", flush=True)
          client_writer.transport.abort()
          return
      try:
          await asyncio.gather(
              pipe(client_reader, server_writer), pipe(server_reader, client_writer)
          )
      finally:
          for writer in (client_writer, server_writer):
              writer.close()
              with contextlib.suppress(OSError):
                  await writer.wait_closed()


  async def main():
      server = await asyncio.start_server(handle, *LISTEN, reuse_address=True, backlog=512)
      print(f"s3 proxy: {LISTEN[0]}:{LISTEN[1]} -> {TARGET[0]}:{TARGET[1]}", flush=True)
      stop = asyncio.Event()
      loop = asyncio.get_running_loop()
      for sig in (signal.SIGTERM, signal.SIGINT):
          loop.add_signal_handler(sig, stop.set)
      async with server:
          await stop.wait()


  if __name__ == "__main__":
      asyncio.run(main())
{{- end -}}
