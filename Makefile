# domain-forge — the two commands: `make demo` (whole pipeline on the embedded demo) and `make test`.
# Both set everything up first; `make setup` is idempotent (a second run takes seconds).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
RUN    ?= runs/demo
# Portable llama.cpp by default (the wheel runs on any x86-64); `make setup LLAMA_NATIVE=1` tunes it
# to this CPU (rebuilds: pip's cache would otherwise serve the portable wheel again).
LLAMA_NATIVE ?= 0
ifeq ($(LLAMA_NATIVE),1)
LLAMA_CMAKE := -DGGML_NATIVE=ON
LLAMA_PIP   := --no-cache-dir --force-reinstall --no-deps
else
LLAMA_CMAKE := -DGGML_NATIVE=OFF
LLAMA_PIP   :=
endif
# Offline everywhere: no model hub on an air-gapped workstation (a hub id would retry for ~47 s).
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test provision clean-demo help

help:
	@echo "make demo   - set up, fetch the demo model and data, run every stage on configs/demo/, write $(RUN)/REPORT.md"
	@echo "make test   - set up, provision the demo model, run the test suite (offline, CPU, one thread)"
	@echo "make setup  - create $(VENV) and install requirements.txt (llama-cpp-python builds once, ~16 min on 2 cores)"

setup: $(VENV)/.installed

# torch first and pinned: any other spec pulls several GB of CUDA wheels on a CPU machine.
$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip wheel setuptools
	$(PIP) install --quiet "torch==2.13.0"
	CMAKE_ARGS="$(LLAMA_CMAKE)" $(PIP) install $(LLAMA_PIP) --quiet -r requirements.txt
	$(PY) -c "import torch, transformers, trl, peft, bitsandbytes, llama_cpp, datasketch, datatrove; print('setup ok: torch', torch.__version__, '| transformers', transformers.__version__, '| llama_cpp', llama_cpp.__version__)"
	touch $@

provision: setup
	$(PY) data/provision_demo.py

test: setup
	$(PY) data/provision_demo.py --only model
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests

demo: provision
	$(PY) data/make_demo_sft.py
	$(PY) 01_build_corpus.py --config configs/demo/01_corpus.yaml --run_dir $(RUN) --overwrite
	$(PY) 02_continual_pretrain.py --config configs/demo/02_cpt.yaml --run_dir $(RUN) --overwrite
	$(PY) -m common.report --run_dir $(RUN)
	@echo "demo finished: see $(RUN)/REPORT.md"

clean-demo:
	rm -rf $(RUN)
