# CoMoTo CLI. `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
COMOTO := $(VENV)/bin/comoto
# The CPU build of torch lies on this disk; a plain `torch` requirement would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
DEMO_DIR ?= demo_data
export OMP_NUM_THREADS ?= 2

.PHONY: install test demo bench bench-full schemas lint reproduce reproduce-lowdata clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# Then the tests that assert on a trained model again, with torch on 2 threads: another reduction order, as another
# CPU gives; both runs must pass (the assertions hold with a margin, not on one machine's float trajectory).
test: install
	$(PY) -m pytest -q tests
	COMOTO_TEST_THREADS=2 $(PY) -m pytest -q -m trained tests

demo: install
	$(PY) -m comoto_cli.demo $(DEMO_DIR)

bench: install
	$(PY) -m benchmarks.run --out benchmarks/results.json

# BCS-DBT-size volumes (64 x 2457 x 1996): preprocess, decoders, predict; about 15 minutes, not part of `make test`.
bench-full: install
	$(PY) -m benchmarks.full --out benchmarks/results-full.json

reproduce: install
	$(COMOTO) experiment configs/experiment-synthetic.json

# Does LsKD add anything to pretraining from the same teacher? Ratio 0.1 with 22 training patients, 212 test
# patients, 5 seeds, the distilled map chosen by `auto` (benchmarks/reproduction/lowdata.md); resumable.
reproduce-lowdata: install
	$(COMOTO) experiment configs/experiment-lowdata.json
	$(COMOTO) experiment configs/experiment-lowdata-components.json
	$(COMOTO) experiment configs/experiment-lowdata-sensitivity.json
	$(COMOTO) experiment configs/experiment-lowdata-layer4.json

schemas: install
	$(COMOTO) config write-schemas schemas

lint: install
	$(VENV)/bin/ruff check comoto_cli tests benchmarks

clean:
	rm -rf $(VENV) $(DEMO_DIR) runs bench_data
