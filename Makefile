# make demo: two relays on loopback, fresh certificates, a stream through them.
# make test: installs what the tests need (Debian packages + a virtualenv), then ruff, mypy, pytest
#            (pytest includes a few seconds of each fuzz target: FUZZ_TEST_S, default 4).
# make fuzz: each coverage-guided fuzz target (tests/fuzz/run.py) for FUZZ_S seconds; corpus and findings in .fuzz/
# make soak: the load soak for SOAK_S seconds (default 600; make test runs it for 90) and 100 injected faults.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_SIZE ?= 4G
FUZZ_S ?= 300
FUZZ_TARGETS := request reply control
SOAK_S ?= 600
SOAK_TESTS := tests/e2e/test_soak_tls_pair.py tests/e2e/test_injected_faults.py
# what the tests run for real: QEMU (e2e migrations), libvirt (two daemons; libvirt-dev + pkg-config
# build libvirt-python), socat/stunnel (bench baselines), systemd-socket-activate, iproute2 + nftables
# (relays in network namespaces over a veth pair that tests blackhole), systemd-analyze + setpriv +
# python3-seccomp (relays under systemd/migrelay.service's own sandbox, tests/unit_sandbox.py;
# libvirt-daemon-system brings the libvirt-qemu user they run QEMU stand-ins as); util-linux + mount
# (unshare, nsenter, mount: relays and QEMU in mount namespaces of their own, the libvirt hosts and
# the sidecar pods); libselinux1 ([relay] socket_context's library, whose answer on a host without
# SELinux is tested); curl (scrapes /metrics as an operator does); gcc + libc6-dev + python3-dev (pip builds
# the data path's compiled loops, relay/daemon/datapath/_hotloop.c; without them it installs the Python ones)
DEB_TEST_PACKAGES := gcc libc6-dev python3-dev qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients libvirt-dev pkg-config \
	socat stunnel4 haproxy systemd iproute2 nftables util-linux mount python3-seccomp libselinux1 curl

.PHONY: demo test venv deps lint unit integration e2e fuzz soak clean

# two stages: the demo needs only the package, the tests also build libvirt-python
$(VENV)/.base: pyproject.toml setup.py relay/daemon/datapath/_hotloop.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(MAKE) --no-print-directory deps
	$(PY) -m pip install -q -e '.[test]'
	touch $@

venv: $(VENV)/.test

demo: $(VENV)/.base
	$(PY) -m relay demo --size $(DEMO_SIZE)

deps:
	@missing=$$(for p in $(DEB_TEST_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

lint: venv
	$(VENV)/bin/ruff check relay tests
	$(VENV)/bin/ruff format --check relay tests
	$(VENV)/bin/mypy

test: deps venv lint
	$(VENV)/bin/pytest -q -p no:cacheprovider tests

unit: venv
	$(VENV)/bin/pytest -q tests/unit
integration: venv
	$(VENV)/bin/pytest -q tests/integration
e2e: deps venv
	$(VENV)/bin/pytest -q tests/e2e
soak: deps venv
	SOAK_S=$(SOAK_S) $(VENV)/bin/pytest -q -p no:cacheprovider $(SOAK_TESTS)

fuzz: venv
	@for t in $(FUZZ_TARGETS); do \
		echo "fuzzing $$t for $(FUZZ_S)s (corpus .fuzz/corpus/$$t, findings .fuzz/findings/)"; \
		mkdir -p .fuzz/findings && \
		$(PY) -m tests.fuzz.run $$t -max_total_time=$(FUZZ_S) -timeout=10 -print_final_stats=1 \
			-artifact_prefix=.fuzz/findings/$$t- .fuzz/corpus/$$t || exit 1; \
	done

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache .fuzz
