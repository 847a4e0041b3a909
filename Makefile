# `make demo` and `make test` work on a fresh clone: they create .venv and install everything first.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
EXTRAS ?= dev,torchao,mobile,search,timm,huggingface

.PHONY: install system-deps demo test acceptance lint bench clean

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

# pytest exits 5 when it collects no test: that is not a failure of the suite.
test: install system-deps
	$(BIN)/python -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$rc

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
