# The two set-up commands of README.md: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=
PEER_VENV  := .venv-peer
PEER_STAMP := $(PEER_VENV)/.installed

.PHONY: demo test venv clean bench test-peer peer-venv

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

# make test includes the peer lane (tests/test_peer_conformance.py, ~1 min): it installs NVIDIA's
# NeMo into .venv-peer first (~1.6 min and 2.4 GB, once; cached). PEER=0 skips both. An install
# that fails (no index reachable, say) does not fail make test: it is logged to .venv-peer.log and
# the lane's tests skip themselves, as they do without a complete .venv-peer (no .installed stamp).
PEER ?= 1
test: $(STAMP)
	@if [ "$(PEER)" != "0" ] && [ ! -f $(PEER_STAMP) ]; then \
	  echo "make test: installing NVIDIA NeMo into $(PEER_VENV) for the peer lane (log: .venv-peer.log)"; \
	  ( bash tools/peer/install.sh $(PEER_VENV) > .venv-peer.log 2>&1 && touch $(PEER_STAMP) ) || \
	  echo "make test: the NeMo install failed (see .venv-peer.log); the peer lane will skip"; fi
	$(if $(filter 0,$(PEER)),HFNEMO_SKIP_PEER=1 ,)$(VPY) -m pytest -q $(PYTEST_ARGS)

# NVIDIA NeMo 2.5.3 + megatron-core 0.14 on CPU (tools/peer/): the oracle of the peer lane.
$(PEER_STAMP): tools/peer/install.sh tools/peer/constraints-nemo.txt tools/peer/patch_modelopt.py
	bash tools/peer/install.sh $(PEER_VENV)
	touch $(PEER_STAMP)

peer-venv: $(PEER_STAMP)

# hfnemo against NVIDIA's own importer, exporter and megatron-core's loader, on this machine.
test-peer: $(STAMP) $(PEER_STAMP)
	$(VPY) -m pytest -q tests/test_peer_conformance.py $(PYTEST_ARGS)

bench: $(STAMP)
	$(VPY) benchmarks/bench_convert.py

clean:
	rm -rf $(VENV) demo-out build src/*.egg-info
