# People and CI run the same targets. `make run` and `make test` work on a fresh machine.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel on this machine's disk; GPU users: make TORCH_SPEC="torch==2.13.0 --index-url ..." (see README).
TORCH_SPEC ?= torch==2.13.0
PROTO_DIR := protos
PROTO_SRC := $(PROTO_DIR)/fedgrad/proto/fedgrad.proto

.PHONY: run test lint proto check-proto bench bench-quick clean install install-dev demo

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e . --config-settings editable_mode=strict
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed pyproject.toml
	$(BIN)/pip install -q "$(TORCH_SPEC)" -e ".[dev]" --config-settings editable_mode=strict
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

run: install
	$(BIN)/fedgrad demo --out runs/demo

test: install-dev
	$(BIN)/python -m pytest -q -p no:cacheprovider -n 2 --dist loadfile -m "not serial" tests
	$(BIN)/python -m pytest -q -p no:cacheprovider -m serial tests

lint: install-dev
	$(BIN)/ruff check common server client launch tests benchmarks examples
	$(BIN)/ruff format --check common server client launch tests benchmarks examples
	$(BIN)/mypy common server client launch
	$(BIN)/lint-imports

proto: install-dev
	$(BIN)/python -m grpc_tools.protoc -I$(PROTO_DIR) --python_out=$(PROTO_DIR) --grpc_python_out=$(PROTO_DIR) --pyi_out=$(PROTO_DIR) $(PROTO_SRC)

check-proto: install-dev
	bash .ci/check-proto

bench: install-dev
	$(BIN)/pip install -q "$(TORCH_SPEC)" -e ".[dev,bench]" --config-settings editable_mode=strict
	$(BIN)/python -m benchmarks.run --out runs/bench

bench-quick: install-dev
	$(BIN)/pip install -q "$(TORCH_SPEC)" -e ".[dev,bench]" --config-settings editable_mode=strict
	$(BIN)/python -m benchmarks.run --quick --out runs/bench-quick

clean:
	rm -rf $(VENV) build *.egg-info runs .pytest_cache .mypy_cache .ruff_cache

# A redesign keeps behaviour: the fedgrad suites, this checkout against BASE, interleaved
# in one run (benchmarks/README.md, "A/B against a baseline"). BASE=<any git rev>.
BENCH_AB_SUITES := fedgrad_round,fedgrad_round_reproducible,fedgrad_push_pull,fedgrad_many_tensors,fedgrad_few_tensors
ifneq ($(filter bench-ab,$(MAKECMDGOALS)),)
ifeq ($(BASE),)
$(error usage: make bench-ab BASE=<git rev>, e.g. make bench-ab BASE=HEAD~1)
endif
endif
.PHONY: bench-ab
bench-ab: install-dev
	$(BIN)/pip install -q "$(TORCH_SPEC)" -e ".[dev,bench]" --config-settings editable_mode=strict
	cli=$$(PY="$(PY)" TORCH_SPEC="$(TORCH_SPEC)" bash benchmarks/baseline.sh "$(BASE)") && \
	$(BIN)/python -m benchmarks.run --out runs/bench-ab --baseline "$$cli" --suites $(BENCH_AB_SUITES)
