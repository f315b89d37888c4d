# Two commands: `make demo` and `make test`. Both create or reuse .venv and install what they need.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: install system-deps demo test ui bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	# torch first, pinned: pip takes the local CPU build; an unpinned torch pulls a multi-GB CUDA build
	$(PIP) install torch==2.13.0
	# compat: a path entry, not an import hook (the hook cost every geojepa command 10 ms of startup)
	$(PIP) install -e ".[dev]" --config-settings editable_mode=compat
	# compile the numba kernels now (~6 s, cached beside their sources), not in the first ingestion
	$(PY) -c "from geojepa_pipeline.geo import minbox, wkb; minbox.warm_up(); wkb.warm_up()"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

# PostgreSQL and Chromium for the e2e tests (deployment topology, UI in a browser); best effort
system-deps:
	bash .ci/system-deps

demo: install
	$(VENV)/bin/geojepa demo

test: install system-deps
	$(PY) -m pytest $(PYTEST_ARGS)

ui: install
	$(VENV)/bin/geojepa ui

bench: install
	$(PY) bench/ingest.py

clean:
	rm -rf $(VENV) geojepa_home .pytest_cache
