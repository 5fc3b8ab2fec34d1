# labvirt: make help lists what you can do.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.DEFAULT_GOAL := help

.PHONY: help
help: ## Show this help
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt package.json package-lock.json
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev]"
	npm ci --no-audit --no-fund --loglevel=error
	@touch $(STAMP)

.PHONY: install
install: $(STAMP) ## Create .venv, install labvirt with its dev tools, and the learner page's npm packages

.PHONY: run
run: install ## Run the whole system locally (Redis, simulator, API, gateway, workers, beat)
	$(BIN)/labvirt dev

.PHONY: test
test: install ## Run the test suite (unit, simulator, end-to-end with real processes)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

.PHONY: test-unit
test-unit: install ## Run only the fast unit tests
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

.PHONY: lint
lint: install ## ruff, mypy, the import-linter contracts and bandit
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy labvirt shared services
	$(BIN)/lint-imports
	$(BIN)/bandit --quiet -c pyproject.toml -r labvirt shared services

.PHONY: format
format: install ## Format and fix what ruff can
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

.PHONY: bench
bench: install ## Run the benchmarks (results go in docs/BENCHMARKS.md)
	$(BIN)/python -m benchmarks.run

.PHONY: chaos
chaos: install ## Chaos, 200 sessions: API faults and cut watches, killed workers and worker children, 30 s Redis restart, Sentinel failover
	LABVIRT_CHAOS_SESSIONS=200 LABVIRT_CHAOS_REDIS_DOWN_SECONDS=30 $(BIN)/python -m pytest -s tests/e2e/test_chaos.py tests/e2e/test_chaos_recovery.py $(PYTEST_ARGS)

.PHONY: pool-load
pool-load: install ## Warm pools under load: 500 concurrent creates against a pool of 100
	LABVIRT_POOL_LOAD=500:100 LABVIRT_REGION_MAX_LIVE_SESSIONS=2000 LABVIRT_REGION_MAX_BOOTING=1000 \
	LABVIRT_REGION_POOL_BUDGET_VMS=400 \
	$(BIN)/python -m pytest tests/e2e/test_pools_e2e.py -k concurrent_creates_against $(PYTEST_ARGS)

.PHONY: redis-bound
redis-bound: install ## What 10,000 ended sessions leave in Redis (make test runs 2,000)
	LABVIRT_REDIS_BOUND_SESSIONS=10000 $(BIN)/python -m pytest -s tests/integration/test_redis_bound.py $(PYTEST_ARGS)

.PHONY: clean
clean: ## Remove the virtualenv, caches and dev state
	rm -rf $(VENV) node_modules .run .pytest_cache .mypy_cache .ruff_cache .hypothesis build *.egg-info
