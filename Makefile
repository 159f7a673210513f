# One entry point for building, testing and benchmarking.
#   make test    creates .venv, installs build/test deps, builds the extension,
#                runs the linters, `cargo test` and pytest.
#   make bench   runs the side-by-side benchmark suite (benches/run.py, 25-30 minutes)
#                on the profile-guided build, with the plain build beside it.
#   make wheel   builds the release wheel, profile-guided (benches/pgo.py), into dist/.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CARGO ?= cargo
export VIRTUAL_ENV := $(abspath $(VENV))
# pip (also as maturin runs it) reports only problems.
export PIP_QUIET := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: all venv build deps test test-rust test-python lint fmt bench bench-smoke wheel clean

all: test

$(VENV)/.ready: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "maturin>=1.9,<2"
	touch $@

venv: $(VENV)/.ready

# Builds the extension in release mode and installs it (editable) with the test and dev extras.
build: venv
	$(VENV)/bin/maturin develop --release --extras test,dev --quiet

lint: build
	$(PY) .ci/check_rust_version.py
	$(CARGO) fmt --all --check
	$(CARGO) clippy --all-targets --all-features --quiet -- -D warnings
	$(CARGO) fmt --check --manifest-path benches/hyper-floor/Cargo.toml
	$(CARGO) clippy --quiet --manifest-path benches/hyper-floor/Cargo.toml -- -D warnings
	$(VENV)/bin/ruff check python tests benches examples
	$(VENV)/bin/ruff format --check python tests benches examples
	$(PY) -m mypy
	$(PY) -m mypy.stubtest --ignore-disjoint-bases keyfailover._native

# The Redis tests start a redis-server of their own.
test-rust: deps
	$(CARGO) test --quiet

# System packages the tests need (redis-server, chromium), installed when missing.
deps:
	./.ci/install-deps.sh

test-python: build deps
	$(PY) -m pytest

bench-smoke: build
	$(CARGO) bench --quiet --bench pool -- --smoke
	$(PY) benches/bench_pool.py --smoke
	timeout 600 $(PY) benches/run.py --smoke
	timeout 300 $(PY) benches/pgo.py train --smoke

test: lint test-rust test-python bench-smoke

# The plain build's package, kept for the bench while the profile-guided one is installed.
PLAIN_BUILD := target/pgo/plain

# The side-by-side suite (installs wrk and nginx with apt-get when missing) on the
# profile-guided build, what `make wheel` ships, with the plain build (`pip install .`'s)
# beside it in the native server's rounds; writes benches/results/latest.md and the plots.
bench: build
	$(VENV)/bin/maturin develop --release --extras test,dev,bench --quiet
	rm -rf $(PLAIN_BUILD) && mkdir -p $(PLAIN_BUILD) && cp -r python/keyfailover $(PLAIN_BUILD)/
	$(PY) benches/pgo.py develop --extras test,dev,bench --quiet
	$(CARGO) build --release --quiet --manifest-path benches/hyper-floor/Cargo.toml
	$(PY) benches/run.py --plain-build $(PLAIN_BUILD)

# The release wheel, profile-guided: built instrumented, trained on the bench suite's load
# (hence the bench extras), built again with the counts. Extra maturin arguments in
# WHEEL_ARGS, e.g. WHEEL_ARGS="--compatibility manylinux_2_34".
WHEEL_ARGS ?=
wheel: venv
	$(VENV)/bin/maturin develop --release --extras test,dev,bench --quiet
	$(PY) benches/pgo.py wheel $(WHEEL_ARGS)

fmt:
	$(CARGO) fmt --all
	$(VENV)/bin/ruff format python tests benches examples
	$(VENV)/bin/ruff check --fix python tests benches examples

clean:
	rm -rf $(VENV) target
