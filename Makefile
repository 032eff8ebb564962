# vpt-pipeline. The two commands: `make demo` and `make test`. Both set everything up on a fresh machine.
SHELL := /bin/bash
PYTHON_BIN ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements.lock
EXTRAS ?= test
TORCH := torch==2.14.1 torchvision==0.29.1
RUN_DIR ?= runs/default
ARGS ?=
APT_PACKAGES := ffmpeg espeak-ng sox strace slurmctld slurmd slurm-client munge slurmdbd mariadb-server-core mariadb-client-core \
	libgl1 libglib2.0-0
STAGES := download frames asr clip audio scenegraph ingest

.PHONY: install lock system-packages test test-fast demo status slurm-up slurm-down bench-metadata bench-frames \
	bench-inference bench-experts bench-ingest bench-train clean $(STAGES) help

help:
	@echo "make demo            the whole pipeline on sample videos it makes itself, tiny models, no cluster"
	@echo "make test            the whole test suite (starts a real local Slurm, Ray, ...)"
	@echo "make install         .venv with everything, pinned by requirements.lock (and Debian packages when root)"
	@echo "                     EXTRAS=test,gpu,wandb adds NVML telemetry and W&B"
	@echo "make lock            re-resolve the dependencies in a throwaway venv and rewrite requirements.lock"
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
	for l in libGL.so.1 libgthread-2.0.so.0; do /sbin/ldconfig -p | grep -q "$$l " || missing="$$missing $$l"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages (missing:$$missing)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PACKAGES) >/dev/null; \
	  else echo "warning: missing system commands:$$missing (install: sudo apt-get install $(APT_PACKAGES))"; fi; \
	fi

# Every package is pinned by requirements.lock (a constraints file: `make lock` rewrites it). The stamp holds the
# extras installed; it is redone when pyproject.toml or the lock change, or when EXTRAS differs.
ifneq ($(shell cat $(STAMP) 2>/dev/null),$(EXTRAS))
$(STAMP): FORCE
endif
FORCE:

$(STAMP): pyproject.toml $(LOCK)
	@$(MAKE) --no-print-directory system-packages
	@test -x $(PY) || $(PYTHON_BIN) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# scenedetect's opencv-python is the one OpenCV: a venv from before may also hold opencv-python-headless,
	@# which writes the same cv2/ (removing it removes shared files, so opencv-python is reinstalled)
	@if $(PY) -m pip show -q opencv-python-headless >/dev/null 2>&1; then \
	  $(PY) -m pip uninstall -q -y opencv-python-headless && \
	  $(PY) -m pip install -q -c $(LOCK) --force-reinstall --no-deps opencv-python; fi
	$(PY) -m pip install -q -c $(LOCK) $(TORCH)
	$(PY) -m pip install -q -c $(LOCK) -e '.[$(EXTRAS)]'
	@echo '$(EXTRAS)' > $(STAMP)

# Re-resolve everything (all extras) in a throwaway venv, the way `make install` installs it, and pin the result.
lock:
	@tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; set -e; \
	$(PYTHON_BIN) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/python" -m pip install -q --upgrade pip; \
	"$$tmp/venv/bin/python" -m pip install -q $(TORCH); \
	"$$tmp/venv/bin/python" -m pip install -q -e '.[test,gpu,wandb]'; \
	{ echo "# Constraints for \`make install\` (pip install -c requirements.lock): every package of a clean install"; \
	  echo "# with all extras (test, gpu, wandb) on Python 3.11, x86_64 Linux. Regenerate with \`make lock\`."; \
	  "$$tmp/venv/bin/python" -m pip freeze --exclude-editable; } > $(LOCK).tmp; \
	mv $(LOCK).tmp $(LOCK); echo "wrote $(LOCK) ($$(grep -c '==' $(LOCK)) pins)"

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
