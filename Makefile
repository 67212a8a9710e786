# Every target here is a step CI runs or a user types; `make help` lists them.
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

CACHE := $(CURDIR)/.cache
VENV := $(CACHE)/venv
PY := $(VENV)/bin/python
export PATH := $(CACHE)/bin:$(VENV)/bin:$(PATH)

# Debian packages the tests and the demo run for real; the image builds (mmdebstrap, buildah), the
# containers the image tests start (podman on runc), and the test node's container runtime
# (containerd, runc, the CNI plugins, iptables for kube-proxy; gcc and libc6-dev for the static
# pause binary).
APT_PACKAGES := prosody prometheus etcd-server iproute2 mmdebstrap buildah podman runc containerd \
	containernetworking-plugins iptables gcc libc6-dev

.PHONY: help install system-packages prosody-13 venv lint test demo demo-down bench-exporter bench-operator cluster-bins cluster cluster-down node node-down manifests images clean

help: ## List the targets.
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F ':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

install: system-packages prosody-13 venv ## Install everything the tests and the demo need (apt + Prosody 13 + pinned Python venv).

system-packages: ## Install the Debian packages above (Prosody, Prometheus, etcd, image tools, containerd, ...) if missing.
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "apt-get install$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# Prosody 13.0 beside Debian's 0.12.3: bookworm-backports' package, downloaded with a private apt
# sources list (the machine's own sources are left alone) and unpacked into .cache/prosody-13;
# its launchers' CFG_* paths point at that tree (unpatched they would load 0.12's code from
# /usr/lib/prosody). Its Depends equal 0.12's, which system-packages installs.
PROSODY13 := $(CACHE)/prosody-13
PROSODY13_SERIES := 13.0
PROSODY13_APT := $(CACHE)/prosody-13-apt
APT_PRIVATE := -o Dir::Etc::SourceList=$(PROSODY13_APT)/sources.list -o Dir::Etc::SourceParts=/dev/null \
	-o Dir::State::Lists=$(PROSODY13_APT)/lists -o Dir::Cache=$(PROSODY13_APT)/cache \
	-o APT::Sandbox::User=root

prosody-13: system-packages $(PROSODY13)/.installed ## Install Prosody 13.0 (bookworm-backports) into .cache/prosody-13, beside Debian's 0.12.

$(PROSODY13)/.installed:
	rm -rf $(PROSODY13) $(PROSODY13_APT)
	mkdir -p $(PROSODY13_APT)/lists/partial $(PROSODY13_APT)/cache/archives/partial
	echo "deb http://deb.debian.org/debian bookworm-backports main" > $(PROSODY13_APT)/sources.list
	apt-get $(APT_PRIVATE) -qq update
	cd $(PROSODY13_APT) && apt-get $(APT_PRIVATE) -qq download prosody/bookworm-backports
	version=$$(dpkg-deb -f $(PROSODY13_APT)/prosody_*.deb Version); \
	case "$$version" in $(PROSODY13_SERIES).*) ;; \
	  *) echo "bookworm-backports has prosody $$version, not $(PROSODY13_SERIES).x: the config dialect and the tests are for $(PROSODY13_SERIES)" >&2; exit 1;; esac; \
	dpkg -x $(PROSODY13_APT)/prosody_*.deb $(PROSODY13); \
	sed -i -e "s|^CFG_SOURCEDIR=.*|CFG_SOURCEDIR='$(PROSODY13)/usr/lib/prosody';|" \
	  -e "s|^CFG_CONFIGDIR=.*|CFG_CONFIGDIR='$(PROSODY13)/etc/prosody';|" \
	  -e "s|^CFG_PLUGINDIR=.*|CFG_PLUGINDIR='$(PROSODY13)/usr/lib/prosody/modules/';|" \
	  -e "s|^CFG_DATADIR=.*|CFG_DATADIR='$(PROSODY13)/var/lib/prosody';|" \
	  $(PROSODY13)/usr/bin/prosody $(PROSODY13)/usr/bin/prosodyctl; \
	mkdir -p $(PROSODY13)/var/lib/prosody; \
	for launcher in prosody prosodyctl; do \
	  [ "$$(grep -c "^CFG_[A-Z]*='$(PROSODY13)/" $(PROSODY13)/usr/bin/$$launcher)" = 4 ] \
	    || { echo "$(PROSODY13)/usr/bin/$$launcher: its CFG_* paths were not rewritten" >&2; exit 1; }; \
	done; \
	echo "$$version" > $@
	rm -rf $(PROSODY13_APT)
	@echo "Prosody $$(cat $@) in $(PROSODY13)"

venv: $(VENV)/.installed ## Create the pinned Python virtualenv in .cache/venv.

$(VENV)/.installed: requirements/*.txt exporter/pyproject.toml operator/pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/dev.txt -c requirements/constraints.txt
	$(PY) -m pip install -q --no-deps -e exporter -e operator
	touch $@

lint: venv ## ruff + mypy.
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: install cluster-bins images ## Run the whole test suite (installs what it needs first).
	$(PY) -m pytest

demo: install cluster-bins images ## Run the main job: the whole chain on a local cluster, printing what Prometheus sees.
	$(PY) -m demo $(ARGS)

demo-down: ## Stop what a demo left behind (the node and control plane, if started outside the demo) and its files.
	$(PY) -m testinfra.node down
	$(PY) -m testinfra.controlplane down
	rm -rf $(CACHE)/demo

bench-exporter: install ## Benchmark the sidecar against Prosody scraped directly and nginx; peak RSS under attacks.
	@$(MAKE) --no-print-directory system-packages APT_PACKAGES="wrk nginx-light"
	$(PY) -m bench.exporter $(ARGS)

bench-operator: install cluster-bins ## Benchmark the webhook and the reconciler against the local control plane.
	$(PY) -m bench.operator $(ARGS)

cluster-bins: ## Build the Kubernetes binaries (one go build), helm, prometheus-operator, Prometheus 3, actionlint into .cache/bin.
	$(PY) -m testinfra.controlplane build

images: install ## Build the operator, sidecar and test Prosody images with buildah into .cache/images (OCI archives).
	$(PY) -m testinfra.images build

cluster: install cluster-bins ## Start a local control plane (etcd, kube-apiserver, controller-manager, scheduler).
	$(PY) -m testinfra.controlplane up

cluster-down: ## Stop the node (if up) and the local control plane, and remove their state.
	$(PY) -m testinfra.node down
	$(PY) -m testinfra.controlplane down

node: cluster images ## Start the test node (kubelet, containerd, kube-proxy) with the images in .cache/images.
	$(PY) -m testinfra.node up

node-down: ## Stop the test node and undo what it changed on the host.
	$(PY) -m testinfra.node down

manifests: venv cluster-bins ## Regenerate manifests/prosody-operator.yaml from the chart (its default values).
	$(PY) -m tools.chart manifests

clean: ## Remove everything the project built or downloaded.
	rm -rf $(CACHE)
