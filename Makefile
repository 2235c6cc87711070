# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# openapi-python-client, for the generated-client test (tests/e2e/test_generated_client.py), in a venv of its
# own: its pins (typer<0.28) conflict with the CLI's typer.
CODEGEN := .venv-codegen
OPENAPI_PYTHON_CLIENT := openapi-python-client==0.29.1

# What the GPU device image lacks (bench/gpu_check.sh), as wheels for its Python 3.12, and a venv holding only what
# that image holds, for the dry run of the GPU check on the CPU (part of `make test`).
GPU_WHEELS := mlxtend==0.25.0
GPU_IMAGE := torch==2.13.0 numpy==2.4.6 safetensors==0.8.0 httpx==0.28.1 matplotlib==3.11.2 pillow==13.0.0 \
	scikit-learn==1.9.1 pytest==9.2.0
GPU_VENV := .venv-gpu

.PHONY: install sandbox browser serve demo test bench perf clean gpu-wheels gpu-dryrun lint

install: sandbox $(VENV)/.installed $(CODEGEN)/.installed

# bubblewrap, the jail's sandbox for foreign models, from Debian's packages (skipped when present).
sandbox:
	bash scripts/install_debian.sh bwrap bubblewrap

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

$(CODEGEN)/.installed: Makefile
	$(PYTHON) -m venv $(CODEGEN)
	$(CODEGEN)/bin/python -m pip install --quiet '$(OPENAPI_PYTHON_CLIENT)'
	touch $@

serve: sandbox $(VENV)/.installed
	$(PY) scripts/serve.py

demo: sandbox $(VENV)/.installed
	$(PY) scripts/demo.py

# Headless Chromium for the dashboard test, from Debian's packages (skipped when present).
browser:
	bash scripts/install_debian.sh chromium,chromedriver chromium chromium-driver

test: install browser gpu-dryrun lint
	$(PY) -m pytest -q

# Lint, format check and type check of the service's packages (pyproject.toml's [tool.ruff] and [tool.mypy]).
lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

gpu-wheels: .whl/.downloaded

.whl/.downloaded: Makefile
	rm -rf .whl
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)
	touch $@

$(GPU_VENV)/.installed: Makefile
	$(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install --quiet $(GPU_IMAGE)
	touch $@

# The GPU check on the CPU with tiny sizes: proves it starts where fastapi, sqlalchemy and celery are absent.
gpu-dryrun: gpu-wheels $(GPU_VENV)/.installed
	PYTHON=$(GPU_VENV)/bin/python OUT=$$(mktemp -d /tmp/gpu-dryrun.XXXXXX) bash bench/gpu_check.sh --dry-run

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
