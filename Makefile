# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install browser serve demo test bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

serve: install
	$(PY) scripts/serve.py

demo: install
	$(PY) scripts/demo.py

# Headless Chromium for the dashboard test, from Debian's packages (skipped when present).
browser:
	bash scripts/install_browser.sh

test: install browser
	$(PY) -m pytest -q

bench: install
	$(PY) bench/reproduce.py

clean:
	rm -rf var .pytest_cache
