# The two commands: `make demo` (the whole pipeline on shipped candles, no network)
# and `make test` (every test). Both create and fill .venv on first use.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test test-quick lint bench asyncapi clean help system-deps images fuzz

help:
	@echo "make demo        run the whole pipeline on shipped Binance candles (no network)"
	@echo "make test        run every test (what CI runs)"
	@echo "make test-quick  skip tests marked slow"
	@echo "make fuzz        the long fuzz: 100k+ mutated and property-based messages through every decode path"
	@echo "make lint        pyflakes checks (ruff)"
	@echo "make bench       run the benchmarks in bench/"
	@echo "make asyncapi    regenerate docs/asyncapi.yaml from the service apps"
	@echo "make images      build every service image with buildah (slow: llama.cpp, torch; SERVICES=... for some)"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/klinebus demo $(DEMO_ARGS)

test: $(STAMP) system-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-quick: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" -x $(PYTEST_ARGS)

# tests/fuzz runs a short budget in every `make test`; this is the long run (minutes).
fuzz: $(STAMP)
	KLINEBUS_FUZZ_MESSAGES=$${KLINEBUS_FUZZ_MESSAGES:-150000} KLINEBUS_FUZZ_EXAMPLES=$${KLINEBUS_FUZZ_EXAMPLES:-3000} \
		$(BIN)/python -m pytest tests/fuzz -q -s -p no:cacheprovider $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	@for b in bench/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

asyncapi: $(STAMP)
	$(BIN)/klinebus asyncapi

# Debian's prometheus (+ promtool) and prometheus-alertmanager for tests/monitoring and the alerts
# tests; idempotent, instant when present, skipped (tests skip too) without root or apt.
system-deps:
	@scripts/system-deps.sh

# Every service image, as tests/deploy/test_image.py builds one (buildah, vfs, chroot; root). The
# base is BASE_IMAGE when set (e.g. docker.io/library/python:3.11-slim), else an offline Debian
# bookworm + python3 made once by debootstrap (scripts/images.py). SERVICES="features alerts" for some.
images: system-deps
	python3 scripts/images.py build $(if $(SERVICES),$(SERVICES),--all)

clean:
	rm -rf $(VENV) var .pytest_cache
