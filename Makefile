# The two commands a newcomer runs, `make demo` and `make test`. Both create .venv and
# install everything themselves.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The labelling tools' own packages (label-studio-sdk, Datumaro, FiftyOne), in a venv of their
# own, as on a reviewer's machine: tests/test_clients.py reads exports back with them.
CLIENTS ?= .venv-clients

.PHONY: demo demo-keypoints demo-clean test lint gpu-check install clients clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) scripts/install.py $(PY) -c constraints.txt -e ".[test]"
	touch $@

clients: $(CLIENTS)/.installed

$(CLIENTS)/.installed: tests/clients/requirements.txt
	$(PYTHON) -m venv $(CLIENTS)
	$(CLIENTS)/bin/python scripts/install.py $(CLIENTS)/bin/python -r tests/clients/requirements.txt
	touch $@

# When make started (before the install), so the demo's summary times all of `make demo`.
STARTED := $(shell date +%s)

demo: install
	DEMO_STARTED=$(STARTED) $(PY) scripts/demo.py

demo-keypoints: install
	DEMO_STARTED=$(STARTED) DEMO_KEYPOINTS=1 $(PY) scripts/demo.py

demo-clean:
	rm -rf demo_out demo_out_s3 demo_out_keypoints demo_out_keypoints_s3

# The two venvs install side by side (most of a fresh clone's install time is unpacking wheels).
test:
	$(MAKE) -j2 install clients
	$(MAKE) lint
	$(MAKE) gpu-check
	PYTHONFAULTHANDLER=1 MASKRCNN_CLIENTS=$(abspath $(CLIENTS)) $(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The GPU paths on this machine's GPU; without one, the same code on the CPU (make test runs it so).
gpu-check: install
	$(PY) scripts/gpu_check.py

clean:
	rm -rf $(VENV) $(CLIENTS) .pytest_cache
