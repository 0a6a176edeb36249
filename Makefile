# Every target sets itself up on a fresh machine: a Python 3.11 venv with the CPU torch wheel.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE := 1
export NM_DISABLE_ANALYTICS := 1
# A fresh machine's disk may be small: pip keeps no second copy of every wheel.
export PIP_NO_CACHE_DIR := 1
DEMO_EVALUATIONS ?= 200

.PHONY: setup demo test lint bench bench-gpu clean resnet-fmnist

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[deepsparse,models,dev]'
	touch $(STAMP)

setup: $(STAMP)

# The main job on the built-in default: SPDY end to end on minilm with DeepSparse at 2x
# (reuses the shipped timing table where it matches this machine, else measures an
# 11-level grid; a second run reuses everything in runs/demo).
demo: $(STAMP)
	$(BIN)/spdy-gpu run --model minilm --backend deepsparse --speedup 2.0 \
		--timings examples/minilm-deepsparse-b1.timings.json --levels 11 \
		--max-evaluations $(DEMO_EVALUATIONS) --out runs/demo

# Retrain the built-in resnet-fmnist and overwrite its shipped checkpoint (needs the Debian
# package dataset-fashion-mnist; 2 epochs: 10-25 min on a 2-core CPU, 91.4% test accuracy).
resnet-fmnist: $(STAMP)
	$(BIN)/python -m spdy_gpu.models.resnet_fmnist train --epochs 2 \
		--out spdy_gpu/models/weights/resnet-fmnist.safetensors

lint: $(STAMP)
	$(BIN)/ruff check spdy_gpu kernels tests bench

test: lint
	$(BIN)/pytest -q tests

bench: $(STAMP)
	$(BIN)/pytest bench/ --benchmark-only

# The GPU benchmarks (NVIDIA GPU): the kernel suite, then SPDY end to end on the Triton
# backend (llama-decode b1/b16 at 1.5/2/3x, BERT-base under torch.compile); results in
# bench/results/. Without a GPU it says so and plans llama-decode from the H100 estimate.
# On a GPU machine whose own Python holds CUDA torch and Triton (no network, so no venv):
# `make bench-gpu GPU_PYTHON=python3` installs this package into it (no dependencies).
# BENCH_GPU_ARGS passes options, e.g. "--parts suite --out DIR" (one part per call).
GPU_PYTHON ?=
BENCH_GPU_ARGS ?=
ifeq ($(GPU_PYTHON),)
bench-gpu: $(STAMP)
	$(BIN)/python bench/bench_gpu.py $(BENCH_GPU_ARGS)
else
bench-gpu:
	$(GPU_PYTHON) -m pip install -q --no-deps --no-build-isolation --ignore-requires-python -e .
	$(GPU_PYTHON) bench/bench_gpu.py $(BENCH_GPU_ARGS)
endif

clean:
	rm -rf $(VENV) runs .pytest_cache .benchmarks
