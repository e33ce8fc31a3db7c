# The two set-up commands of the README, plus the checks they run. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PYTEST_ARGS ?=
NPM    ?= npm
JS     := tests/js

SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test lint typecheck pytest bench clean pgbouncer chromium pushgateway

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Stamp files re-run the install when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@ $(VENV)/.installed

# The real @supabase/supabase-js client the tests call the functions server with, exactly as locked. npm ci writes
# node_modules/.package-lock.json, the stamp: a changed lock file re-runs it. Without node or npm the run stops here.
$(JS)/node_modules/.package-lock.json: $(JS)/package.json $(JS)/package-lock.json
	@command -v node >/dev/null 2>&1 || { echo "error: node is not installed (the supabase-js tests need Node >= 20 and npm)" >&2; exit 1; }
	@node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)' || { echo "error: node $$(node --version) is too old (the supabase-js tests need Node >= 20)" >&2; exit 1; }
	@command -v $(NPM) >/dev/null 2>&1 || { echo "error: npm is not installed (the supabase-js tests install their client with npm ci)" >&2; exit 1; }
	cd $(JS) && $(NPM) ci --no-audit --no-fund --loglevel=error
	touch $@

demo: $(VENV)/.installed
	$(BIN)/gatefill demo

test: $(VENV)/.installed-test pgbouncer chromium pushgateway lint typecheck pytest

# The pooled half of the suite runs through PgBouncer (Debian's package), which the tests start themselves.
pgbouncer:
	@command -v pgbouncer >/dev/null 2>&1 || test -x /usr/sbin/pgbouncer || { \
	  echo "installing pgbouncer (Debian package) for the pooled tests"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends pgbouncer >/dev/null; }

# The console's browser tests drive Debian's Chromium through Playwright (never `playwright install`: no downloads).
chromium:
	@command -v chromium >/dev/null 2>&1 || test -x /usr/bin/chromium || { \
	  echo "installing chromium (Debian package) for the console's browser tests"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

# The metrics export tests push to Debian's Pushgateway, which they start themselves (the package's own service is
# not needed: it is stopped and disabled where the system runs services).
pushgateway:
	@command -v prometheus-pushgateway >/dev/null 2>&1 || test -x /usr/bin/prometheus-pushgateway || { \
	  echo "installing prometheus-pushgateway (Debian package) for the metrics export tests"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus-pushgateway >/dev/null; }

lint: $(VENV)/.installed-test
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts
	$(BIN)/lint-imports --no-logo

typecheck: $(VENV)/.installed-test
	$(BIN)/mypy

pytest: $(VENV)/.installed-test pgbouncer chromium pushgateway $(JS)/node_modules/.package-lock.json
	$(BIN)/pytest -n 2 --dist loadscope -q $(PYTEST_ARGS)

bench: $(VENV)/.installed-test
	$(BIN)/python bench/bench_scoring.py

clean:
	rm -rf $(VENV) gatefill-demo .pytest_cache .mypy_cache .ruff_cache $(JS)/node_modules
