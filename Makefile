# Every target sets up what it needs: a fresh clone runs `make demo` or `make test` directly.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
LINTED := bulkdisconnect tests $(wildcard benchmarks)
MANIFESTS := $(wildcard jobs/k8s/*.yaml)
# The manifests are checked offline against the schemas of the oldest Kubernetes they need
# (backoffLimitPerIndex, FailIndex: 1.29) and the newest the pinned kubernetes-validate bundles.
KUBE_VERSIONS ?= 1.29.0 1.37.0

# The image (Dockerfile) is tagged with the project's version; jobs/k8s/*.yaml run this name.
VERSION ?= $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml)
IMAGE ?= registry.example.com/bulkdisconnect:$(VERSION)
REVISION ?= $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
# ENGINE=docker|podman picks one; else the first on PATH whose daemon answers. SOURCE= sets
# the image's org.opencontainers.image.source label (the repository's URL).
ENGINE ?=
SOURCE ?=

.PHONY: install lint test demo bench image image-name clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=25.1"
	$(BIN)/python -m pip install --quiet --editable . --group dev
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile
	for version in $(KUBE_VERSIONS); do \
	    $(BIN)/kubernetes-validate --strict --quiet --kubernetes-version $$version \
	        $(MANIFESTS) || exit 1; \
	done

test: lint
	$(BIN)/python -m pytest

demo: install
	bash scripts/demo.sh

bench: install
	$(BIN)/python -m pip install --quiet --group bench
	$(BIN)/python -m benchmarks

image:
	@engine="$(ENGINE)"; \
	if [ -z "$$engine" ]; then \
	    for candidate in docker podman; do \
	        if command -v $$candidate >/dev/null 2>&1 && $$candidate info >/dev/null 2>&1; then \
	            engine=$$candidate; break; \
	        fi; \
	    done; \
	fi; \
	if [ -z "$$engine" ]; then \
	    echo "make image: no container engine here (docker or podman with its daemon running)." >&2; \
	    echo "Build and push $(IMAGE) where there is one, from a checkout of this commit:" >&2; \
	    echo "  docker build --build-arg VERSION=$(VERSION) --build-arg REVISION=$(REVISION) \\" >&2; \
	    echo "      -t $(IMAGE) ." >&2; \
	    echo "  docker push $(IMAGE)" >&2; \
	    echo "(podman takes the same arguments; IMAGE=registry/name:tag names it.)" >&2; \
	    exit 1; \
	fi; \
	set -x; \
	"$$engine" build --build-arg VERSION=$(VERSION) --build-arg REVISION=$(REVISION) \
	    $(if $(SOURCE),--build-arg SOURCE=$(SOURCE)) --tag $(IMAGE) .

image-name:
	@echo $(IMAGE)

clean:
	rm -rf $(VENV) state demo-output .mypy_cache .ruff_cache .pytest_cache
