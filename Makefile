# `make demo` and `make test` work on a fresh clone: they create .venv and install everything first.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
EXTRAS ?= dev,torchao,mobile,search,timm,huggingface

.PHONY: install system-deps demo test test-avx2 acceptance lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[$(EXTRAS)]'
	touch $(STAMP)

install: $(STAMP)

# System packages some tests use: qemu-user emulates an AVX2-only CPU (int8 files must be exact there too),
# chromium takes report.html screenshots, postgresql serves the two-worker search's shared study.
# Installed where apt-get runs as root; elsewhere the tests that need them skip and say why.
SYSTEM_PACKAGES := qemu-user chromium postgresql
system-deps:
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then \
	    echo "installing$$missing"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null) \
	      || echo "could not install$$missing: the tests that need them will skip"; \
	  fi; \
	fi

demo: install
	$(BIN)/compresspipe run recipes/quickstart.yaml --force

# pytest exits 5 when it collects no test: that is not a failure of the suite. One worker per core (pytest-xdist,
# at most 4): the suite is mostly single-threaded Python (torch.onnx's exporter, small models), ~9.5 min on 2 cores.
test: install system-deps
	$(BIN)/python -m pytest -q -n auto --maxprocesses=4; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$rc

# The int8 tests (pytest -m int8) on an emulated AVX2-only CPU: ONNX Runtime's u8s8 kernels without VNNI, as on a
# Haswell..Skylake or Zen 1-3 machine, from any x86-64 machine with qemu-user. The host's VNNI cannot hide a
# file that is only correct with it. Slow (torch is emulated too): pass TESTS= to narrow it.
HASWELL := Haswell,-pcid,-x2apic,-tsc-deadline,-hle,-invpcid,-rtm
TESTS ?= tests
test-avx2: install system-deps
	@command -v qemu-x86_64 >/dev/null || { echo "test-avx2 needs qemu-user (make system-deps as root)"; exit 1; }
	COMPRESSPIPE_EMULATED_CPU=Haswell qemu-x86_64 -cpu $(HASWELL) $(BIN)/python -m pytest -q -m int8 -p no:cacheprovider $(TESTS); \
	  rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest: no int8 tests collected"; exit 0; fi; exit $$rc

# every export format after every compression stage, builtin and torchvision models (~20 min on 2 cores)
acceptance: install
	COMPRESSPIPE_ACCEPTANCE=1 $(BIN)/python -m pytest -q tests/acceptance

lint: install
	$(BIN)/ruff check compresspipe tests benchmarks
	$(BIN)/mypy compresspipe benchmarks

bench: install
	$(BIN)/python -m benchmarks

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
