# Entry points for a fresh machine: `make quickstart` trains the example forest on this CPU,
# `make test` lints and tests; both create .venv and install what they need first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test test-fast lint typecheck pytest install clean quickstart reliability bench bench-quick \
	cluster-build cluster-up cluster-down images

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	# The CPU torch wheel first and pinned exactly, so no dependency can pull a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[trainer,operator,local,dev,bench]'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# Two workers (this machine and CI have 2 cores): whole modules each, the cluster tier (mostly
# waiting on its control plane and pods) as one unit, the longest first (tests/conftest.py).
pytest: $(STAMP)
	$(VENV)/bin/pytest -n 2 --dist loadscope --no-loadscope-reorder

# The pure and unit tiers in under two minutes, no build: what to run while you work.
test-fast: $(STAMP)
	$(VENV)/bin/pytest -q -m "not heavy"

# The Go build of the control plane (CPU) runs beside the Python installs and the image builds
# (mostly downloads); the images wait for the install (both build the project's metadata in place).
test:
	$(MAKE) -j2 install cluster-build images
	$(MAKE) lint typecheck pytest

# The operator and trainer images, built with podman from Debian's packages and a wheelhouse at
# constraints.txt's versions (tests/harness/imagebuild.py; podman, runc and mmdebstrap are
# installed from Debian's packages where missing). Cached by their inputs: warm, seconds.
images: $(STAMP)
	python3 -m tests.harness.imagebuild

# The real Kubernetes control plane of the cluster tests (tests/cluster; docs/testing.md):
# built once from the pinned Go modules tests/cluster/kube, kueue and coredns into
# ~/.cache/elmforest/kube.
# pytest starts and stops it; without Go those tests are skipped, and say why.
cluster-build:
	@if command -v go >/dev/null; then python3 -m tests.harness.kubebuild --kueue --coredns; \
	else echo "no Go toolchain on PATH: the cluster tests (tests/cluster) will be skipped"; fi

# A control plane to use by hand: writes .cluster/kubeconfig and .cluster/bin/{kubectl,helm,...}.
cluster-up: $(STAMP)
	$(PY) -m tests.harness.controlplane up

cluster-down:
	$(PY) -m tests.harness.controlplane down

# A whole forest (tokenizer, seed, four experts, report) on this machine's CPU, in minutes.
quickstart: $(STAMP)
	$(VENV)/bin/elmforest up -f examples/quickstart/

# The whole reliability sweep (47 minutes on 2 cores; docs/reliability.md): every crash
# point and 20 double crashes, then the fault, preemption, concurrency and soak tests at full
# size and 20x the fuzzing. The suite (`make test`) runs a seeded sample of each.
reliability: $(STAMP)
	$(PY) -m tests.reliability.sweep --doubles 20 --out reliability-results.json
	ELMFOREST_FUZZ_SCALE=20 ELMFOREST_SOAK_BRANCHES=40 $(VENV)/bin/pytest -s \
	  tests/reliability tests/planner/test_hostile_input.py tests/trainer/test_s3_faults.py \
	  tests/trainer/test_resume.py tests/operator/test_end_to_end.py::test_operator_restart_and_preemption
	ELMFOREST_SERVE_FUZZ_SCALE=10 $(VENV)/bin/pytest -s tests/serving/test_hostile_traffic.py

# Every benchmark at full size (docs/benchmarks.md; about 2.7 hours on 2 cores, the BTM
# quality run most of it); results to bench/results/, plots to docs/img/.
bench: $(STAMP)
	for b in merge train ensemble serve data operator cli btm_quality btx discovery; do $(PY) -m bench.$$b || exit 1; done

# Every benchmark's small variant (a few minutes in all); the suite runs them too.
bench-quick: $(STAMP)
	for b in merge train ensemble serve data operator cli btm_quality btx discovery; do $(PY) -m bench.$$b --quick || exit 1; done

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
