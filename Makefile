# Two commands for a fresh clone: `make demo` and `make test` (each installs into .venv first).
VENV  ?= .venv
PY    := $(VENV)/bin/python
# torch goes in first and pinned: a bare `torch` requirement resolved alone pulls a multi-GB CUDA build.
# Override for your machine, e.g. `make test TORCH='torch --index-url https://download.pytorch.org/whl/cu124'`.
TORCH ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1

.PHONY: demo test clean

$(VENV)/.installed-base: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed-base
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

# MosaicML Streaming pins transformers<5 and numpy<2.2: it gets a side venv, read by tests/test_export.py.
$(VENV)/.installed-streaming: $(VENV)/.installed-dev tests/_streaming_env.py
	$(PY) tests/_streaming_env.py $(VENV)/streaming
	touch $@

demo: $(VENV)/.installed-base
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash examples/demo.sh

test: $(VENV)/.installed-dev $(VENV)/.installed-streaming
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) demo-out
