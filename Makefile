# Two commands do all the set-up: `make demo` and `make test` (both run `setup` first).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup system demo test bench
setup: system $(STAMP)

# torch and torchvision first, as a pair: PyPI's torchvision does not import beside the
# CPU torch file on this machine (DESIGN §5). Then the project with its dev extras.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $(STAMP)

# Debian's broker and offline data set, when missing and running as root.
system:
	@missing=""; \
	test -x /usr/sbin/mosquitto || missing="$$missing mosquitto"; \
	test -d /usr/share/datasets/fashion-mnist || missing="$$missing dataset-fashion-mnist"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $$missing; \
	  else echo "missing Debian packages:$$missing (run: sudo apt-get install$$missing)"; fi; \
	fi

demo: setup
	$(VENV)/bin/restnet demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/stitch_bench.py
	$(VENV)/bin/restnet catalog build
	$(PY) bench/rank_bench.py
	$(PY) bench/delta_bench.py
	$(PY) bench/fleet_bench.py --sizes 100,500,1000
	$(PY) bench/fault_bench.py --devices 200
