# vpt-pipeline. The two commands: `make demo` and `make test`. Both set everything up on a fresh machine.
SHELL := /bin/bash
PYTHON_BIN ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RUN_DIR ?= runs/default
ARGS ?=
APT_PACKAGES := ffmpeg espeak-ng sox strace slurmctld slurmd slurm-client munge slurmdbd mariadb-server-core mariadb-client-core
STAGES := download frames asr clip audio scenegraph ingest

.PHONY: install system-packages test test-fast demo status slurm-up slurm-down bench-metadata bench-frames \
	bench-inference bench-experts bench-ingest bench-train clean $(STAGES) help

help:
	@echo "make demo            the whole pipeline on sample videos it makes itself, tiny models, no cluster"
	@echo "make test            the whole test suite (starts a real local Slurm, Ray, ...)"
	@echo "make install         .venv with everything (and Debian packages when run as root)"
	@echo "make <stage> ARGS='run_dir=... [overrides]'   one stage: $(STAGES)"
	@echo "make status RUN_DIR=runs/x                    done / failed / pending per stage"
	@echo "make slurm-up / slurm-down                    a real Slurm (+accounting) on this machine"
	@echo "make bench-metadata | bench-frames | bench-inference | bench-experts | bench-ingest | bench-train"
	@echo "                                              benchmarks (results in benchmarks/results/)"

install: $(STAMP)

# Debian packages: installed when missing and we are root (CI, containers); otherwise say what is missing.
system-packages:
	@missing=""; for c in ffmpeg espeak-ng sox strace slurmctld slurmd sbatch munged slurmdbd mariadbd; do \
	  command -v $$c >/dev/null 2>&1 || [ -x /usr/sbin/$$c ] || missing="$$missing $$c"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages (missing:$$missing)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PACKAGES) >/dev/null; \
	  else echo "warning: missing system commands:$$missing (install: sudo apt-get install $(APT_PACKAGES))"; fi; \
	fi

$(STAMP): pyproject.toml
	@$(MAKE) --no-print-directory system-packages
	@test -x $(PY) || $(PYTHON_BIN) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

test: install
	$(PY) -m pytest tests -ra --durations=15

test-fast: install
	$(PY) -m pytest tests -ra -m "not slurm and not slow"

demo: install
	$(PY) -m pipeline.demo

status: install
	$(PY) -m pipeline status run_dir=$(RUN_DIR)

$(STAGES): install
	$(PY) -m pipeline stage=$@ $(ARGS)

slurm-up:
	bash slurm/local_cluster.sh up $(ARGS)

slurm-down:
	bash slurm/local_cluster.sh down $(ARGS)

bench-metadata: install
	$(PY) -m benchmarks.metadata $(ARGS)

bench-frames: install
	$(PY) benchmarks/frames_bench.py --write $(ARGS)

bench-inference: install
	$(PY) benchmarks/inference_bench.py --out benchmarks/results/inference.md $(ARGS)

bench-experts: install
	$(PY) benchmarks/experts_bench.py --write $(ARGS)

bench-ingest: install
	$(PY) -m benchmarks.ingest_bench $(ARGS)

bench-train: install
	$(PY) benchmarks/train_bench.py $(ARGS)

clean:
	rm -rf runs .pytest_cache
