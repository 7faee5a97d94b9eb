# kmesh-py: see README.md
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export BCC_KERNEL_SOURCE ?= $(CURDIR)/.build/kernel-src

.PHONY: setup test lint protos bench demo demo-down clean image

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m ruff check .
	$(PY) -m pytest -q -ra tests

lint: setup
	$(PY) -m ruff check .

protos: setup
	$(PY) -m daemon.xds.genprotos

bench: setup
	$(PY) -m benchmarks

# The daemon image from ./Dockerfile, built with podman offline (see scripts/image.sh); cached by content hash.
image: setup
	bash scripts/image.sh

demo: setup
	bash scripts/demo.sh

demo-down:
	$(VENV)/bin/kmeshctl sandbox down

readme: setup
	$(PY) scripts/gen_cli_reference.py

clean:
	rm -rf .build .venv
