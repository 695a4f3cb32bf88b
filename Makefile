# The two set-up commands of the README. Both create .venv on first use (a few minutes) and reuse it after.
#   make demo    train and evaluate the small demo model on a generated data set (CPU or GPU)
#   make test    run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test clean-venv

# torch==2.13.0 first: pip then keeps this CPU build instead of pulling a multi-GB CUDA one for `torch>=2.4`.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The demo: generate the synthetic motion set once, train (resuming if interrupted), then test 10x3 on val.
demo: $(STAMP)
	test -f data/demo/dataset.json || $(PY) tools/make_synthetic.py motion --out data/demo
	$(PY) train.py --config configs/demo.yaml --work-dir work_dirs/demo --resume auto
	$(PY) evaluate.py --work-dir work_dirs/demo --views 10x3

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
