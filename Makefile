# Two commands do everything on a fresh machine:
#   make demo   # install into .venv, then train + COCO-evaluate the non-local Mask R-CNN on the built-in dataset
#   make test   # install into .venv, then run the tests
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_CONFIG ?= configs/quick/mask_rcnn_nl_R18_shapes.yaml
PYTEST_ARGS ?=

.PHONY: install demo test clean

install: $(STAMP)

# Re-runs only when the dependency list, the detectron2 installer or setup.py change.
$(STAMP): requirements.txt scripts/install_detectron2.py setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade "pip>=23"
	$(PY) -m pip install -r requirements.txt
	$(PY) scripts/install_detectron2.py
	$(PY) -m pip install --no-deps -e .
	touch $@

# --resume: an interrupted demo continues where it stopped; a finished one is evaluated again.
demo: install
	$(PY) tools/train_net.py --config-file $(DEMO_CONFIG) --resume

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) output build dist *.egg-info
