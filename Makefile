# `make demo` and `make test` each set themselves up from nothing: a virtual environment in .venv,
# the exact dependency set of constraints.txt, then the run.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.dclip-installed
# Nothing downloads at run time: models and datasets are local (see docs/real-data.md).
export HF_HUB_OFFLINE := 1
export YOLO_OFFLINE := 1
# dvc runs each stage's `dclip …` command through a shell: put the environment first on PATH.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup browser demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	# LAION's CLIP_benchmark, whose own metric code the parity tests run. Without its dependencies
	# (transformers, pycocoevalcap, …): its retrieval and zero-shot metrics need only torch, tqdm and
	# scikit-learn (in the dev extra).
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps clip-benchmark==1.6.2
	touch $@

demo: $(STAMP)
	$(BIN)/dclip repro

# Debian's Chromium, which the HTML report's test drives through Playwright (no browser download):
# installed when missing where apt-get can (as root); elsewhere that one test says why it skips.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
		|| echo "no chromium (apt-get install chromium): the HTML report's browser test will skip"

test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest --durations=15  # the slowest tests in the log, to keep CI short

# mypy checks the files that pyproject.toml's [tool.mypy] names: pipeline/ and stages/.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
