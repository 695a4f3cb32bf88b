# The two set-up commands of the README. Both create .venv on first use (a few minutes) and reuse it after.
#   make demo    train and evaluate the small demo model on a generated data set (CPU or GPU)
#   make test    run the test suite
# And one for the benchmarks only (never needed by demo/test):
#   make peer-venv   build .peer-venv, MMAction2 1.2.0's own environment, for benchmarks/mmaction2_peer.py
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test clean-venv peer-venv

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

# MMAction2 1.2.0 as the loader benchmarks' peer, in its own venv so that .venv never sees it. torch==2.13.0 first (the
# CPU build, as above); mmaction2 1.2.0 asserts mmcv < 2.2, hence mmcv-lite==2.1.0; --no-deps because its declared
# requirements would pull a full mmcv build; then the few packages its import and its video transforms need.
PEER_VENV := .peer-venv
PEER_PY := $(PEER_VENV)/bin/python
PEER_STAMP := $(PEER_VENV)/.installed

peer-venv: $(PEER_STAMP)

$(PEER_STAMP):
	test -x $(PEER_PY) || $(PYTHON) -m venv $(PEER_VENV)
	$(PEER_PY) -c "import torch" 2>/dev/null || $(PEER_PY) -m pip install --quiet torch==2.13.0
	$(PEER_PY) -m pip install --quiet mmengine mmcv-lite==2.1.0
	$(PEER_PY) -m pip install --quiet --no-deps mmaction2==1.2.0
	$(PEER_PY) -m pip install --quiet einops scipy importlib_metadata opencv-python-headless decord av
	touch $(PEER_STAMP)
