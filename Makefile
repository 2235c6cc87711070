# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# openapi-python-client, for the generated-client test (tests/e2e/test_generated_client.py), in a venv of its
# own: its pins (typer<0.28) conflict with the CLI's typer.
CODEGEN := .venv-codegen
OPENAPI_PYTHON_CLIENT := openapi-python-client==0.29.1

.PHONY: install browser serve demo test bench perf clean

install: $(VENV)/.installed $(CODEGEN)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

$(CODEGEN)/.installed: Makefile
	$(PYTHON) -m venv $(CODEGEN)
	$(CODEGEN)/bin/python -m pip install --quiet '$(OPENAPI_PYTHON_CLIENT)'
	touch $@

serve: $(VENV)/.installed
	$(PY) scripts/serve.py

demo: $(VENV)/.installed
	$(PY) scripts/demo.py

# Headless Chromium for the dashboard test, from Debian's packages (skipped when present).
browser:
	bash scripts/install_browser.sh

test: install browser
	$(PY) -m pytest -q

# The paper's numbers (docs/reproduction.md); about 22 minutes on 2 CPU cores.
bench: install
	$(PY) bench/reproduce.py

# The performance benchmarks, quick settings (docs/performance.md has the full ones); about 12 minutes on 2 CPU
# cores; the load test needs PostgreSQL and Redis as for `make test`. On a GPU machine: bench/gpu_check.sh.
perf: install
	$(PY) bench/engine_vs_plain.py
	$(PY) bench/seeds.py
	$(PY) bench/host_overhead.py
	$(PY) bench/service_overhead.py
	$(PY) bench/load.py --seconds 20 --clients 8

clean:
	rm -rf var .pytest_cache
