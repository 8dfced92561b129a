# Two entry points for a fresh machine (see README): `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: install demo test proto lint typecheck clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# Index the bundled sample gallery, serve it, classify and search through the client.
demo: install
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash scripts/demo.sh

# Lint and type-check first (seconds, about a minute cold), then the tests.
test: lint typecheck
	$(PY) -m pytest -q

# Regenerate the gRPC stubs from proto/ (tests/test_proto.py fails when they drift).
proto: install
	$(PY) -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. proto/pictor/v1/pictor.proto

lint: install
	$(VENV)/bin/ruff check .

# mypy, cross-module calls included: the top-level folders are pictor.* only through package-dir,
# which mypy cannot follow, so scripts/typecheck.py links them into build/typecheck/ as pictor.*.
typecheck: install
	$(PY) scripts/typecheck.py

clean:
	rm -rf $(VENV) build *.egg-info
