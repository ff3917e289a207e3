# Set-up in two commands: `make demo` and `make test` create the virtual environment $(VENV)
# from requirements.txt on first use (and again whenever requirements.txt changes), then run
# train.py or pytest in it. The plain commands (README "Set-up") work in any environment you
# manage yourself; .ci/run runs `make test`.
#
#   make demo                                     # the SN demo (configs/demo/resnet_sn.yaml)
#   make demo CONFIG=configs/demo/resnet_bn.yaml ARGS="train.epochs=10 output_dir=runs/bn10"
#   make test PYTEST_ARGS="-q tests/engine"       # a part of the tests
#   make venv                                     # only the environment
#
# VENV_FLAGS: by default the environment sees the interpreter's own packages
# (--system-site-packages), so a machine that already has torch at the pinned version keeps
# using it (seconds) instead of installing a second copy of torch and CUDA's libraries
# (6 GB); pip installs what is missing or at another version into $(VENV). VENV_FLAGS= makes
# an isolated environment.

PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?= --system-site-packages
CONFIG ?= configs/demo/resnet_sn.yaml
ARGS ?=
PYTEST_ARGS ?= -q

PY := $(VENV)/bin/python
# The stamp is named after requirements.txt's hash: a changed file means a missing stamp.
HASH := import hashlib; print(hashlib.sha256(open("requirements.txt", "rb").read()).hexdigest()[:16])
REQ_HASH := $(shell $(PYTHON) -c '$(HASH)')
STAMP := $(VENV)/.requirements-$(REQ_HASH)

.PHONY: help demo test venv clean-venv

help:
	@echo "make demo   train the demo ($(CONFIG); CONFIG=... ARGS=\"key=value ...\")"
	@echo "make test   run the tests (PYTEST_ARGS=\"$(PYTEST_ARGS)\")"
	@echo "make venv   create or update $(VENV) from requirements.txt only"
	@echo "both create $(VENV) on first use and update it when requirements.txt changes"

demo: $(STAMP)
	$(PY) train.py --config $(CONFIG) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

venv: $(STAMP)

$(STAMP):
	@rm -f $(VENV)/.requirements-*
	@test -x $(PY) || { echo "creating $(VENV) ($(PYTHON) -m venv $(VENV_FLAGS))"; \
		$(PYTHON) -m venv $(VENV_FLAGS) $(VENV); }
	@echo "installing requirements.txt into $(VENV) (pip's log: $(VENV)/pip.log)"
	@$(PY) -m pip install -r requirements.txt > $(VENV)/pip.log 2>&1 || \
		{ tail -n 20 $(VENV)/pip.log; echo "pip failed: see $(VENV)/pip.log"; exit 1; }
	@touch $@

clean-venv:
	rm -rf $(VENV)
