# Two entry points: `make demo` (build the proxy dataset, train FerretNet-S on it, evaluate, detect) and `make test`.
# Each creates .venv and installs what it needs, torch 2.13.0 (CPU) included.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint docs bench gpu-check clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[train,export,serve,video,ray,openvino,gpu-decode,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ferret demo --out demo_out

test: $(STAMP)
	$(PY) -m pytest -q

# What CI runs besides the tests: the linter (rules in pyproject.toml) and the manual, warnings as errors.
lint: $(STAMP)
	$(VENV)/bin/ruff check .

docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --site-dir "$${TMPDIR:-/tmp}/ferret-site"

bench: $(STAMP)
	$(PY) -m pytest benchmarks --benchmark-enable --benchmark-columns=min,median,iqr,ops -q

# The whole GPU story on a bare GPU machine: the Python on PATH (or PYTHON=...), no install, no network,
# within 6 minutes. OUT=DIR: where gpu-check.json and gpu-check.txt go; GPU_CHECK_ARGS: more options.
gpu-check:
	$(PYTHON) -m benchmarks.gpu_check $(if $(OUT),--out "$(OUT)") $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) demo_out .pytest_cache .benchmarks
