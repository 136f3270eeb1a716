# The two set-up commands of README.md: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test venv clean bench

$(VPY):
	$(PY) -m venv $(VENV)

# torch first, pinned: the CPU wheel on this machine; anything newer pulls a multi-GB CUDA build.
$(STAMP): $(VPY) pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VPY) -m hfnemo.demo demo-out

test: $(STAMP)
	$(VPY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(VPY) benchmarks/bench_convert.py

clean:
	rm -rf $(VENV) demo-out build src/*.egg-info
