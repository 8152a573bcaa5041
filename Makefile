# olaf: the two commands a newcomer runs on a fresh machine.
#   make test   set up .venv (torch first, then olaf[dev]), run the suite's fast tier (make test-slow: the rest,
#               with .venv-authors, the authors' pins)
#   make demo   same set-up, then the main job end to end on the bundled sample
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build on a machine without CUDA wheels in reach; the same pin gives the CUDA build on a GPU box.
TORCH_SPEC ?= torch==2.13.0
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: help setup authors-env test test-slow test-all demo lint gpu-proof
help:
	@echo "make test        set up $(VENV) and run the suite's fast tier (a few minutes)"
	@echo "make test-slow   the slow tier: Ray jobs and clusters, killed processes, the authors' pinned"
	@echo "                 environment, every benchmark at a tiny size (CI runs both tiers)"
	@echo "make demo        set up $(VENV) and run extraction + training end to end on the bundled sample"

$(PY):
	@echo "== creating $(VENV)"
	$(PYTHON) -m venv $(VENV)

# Stamp files: a re-run finds them and installs nothing.
$(VENV)/.torch-installed: | $(PY)
	@echo "== installing $(TORCH_SPEC)"
	$(PIP) install "$(TORCH_SPEC)"
	@touch $@

$(VENV)/.olaf-installed: pyproject.toml $(VENV)/.torch-installed
	@echo "== installing olaf[dev] (editable)"
	$(PIP) install -e '.[dev]'
	@touch $@

setup: $(VENV)/.olaf-installed

# The authors' pinned environment (transformers 4.41.1, ...) that tests/test_authors_env.py loads exports in:
# built once (~45 s) into .venv-authors, rebuilt when tests/authors/env.py changes its pins.
authors-env: setup
	$(PY) tests/authors/env.py >/dev/null

# Two tiers: `make test` is the fast one (everyone's loop); `make test-slow` (pytest -m slow) the tests that
# start Ray clusters, kill processes, build the authors' environment or run every benchmark. CI runs both.
test: setup
	$(PY) -m pytest -m "not slow"

test-slow: setup authors-env
	$(PY) -m pytest -m slow

test-all: setup authors-env
	$(PY) -m pytest

# Every GPU figure the README owes, in one JSON (benchmarks/gpu_proof/; docs/benchmarks.md#the-gpu-proof).
GPU_PROOF ?= gpu_proof
GPU_PROOF_MINUTES ?= 8
gpu-proof: setup
	$(PY) -m benchmarks.gpu_proof --out $(GPU_PROOF) --minutes $(GPU_PROOF_MINUTES)

lint: setup
	$(VENV)/bin/ruff check recipes teachers store pipeline trainer tests benchmarks support

# ---- the demo: sample data -> tiny teachers -> local Ray head -> `ray job submit` extraction -> inspect
#      -> tiny LLM + CLIP -> trainer.pt (a few dozen PT steps) -> export + loss curve
DEMO ?= demo
DEMO_DIR := $(abspath $(DEMO))
DEMO_SAMPLES ?= 48
DEMO_STEPS ?= 40
DEMO_PROBE_STEPS ?= 8
DEMO_RAY_PORT ?= 6390
DEMO_DASHBOARD_PORT ?= 8275
export HF_HUB_OFFLINE := 1

demo: setup
	@echo "== 1/7 sample dataset (LLaVA format, with broken and awkward images mixed in) -> $(DEMO)/data"
	$(PY) -m pipeline.sample $(DEMO_DIR)/data --num-samples $(DEMO_SAMPLES) --bad 7 --odd 7 --seed 0
	@echo "== 2/7 tiny random-weight teachers -> $(DEMO)/teachers"
	$(PY) -m teachers.tiny $(DEMO_DIR)/teachers
	@echo "== 3/7 extraction: a Ray head on 127.0.0.1 (stopped afterwards), the job through 'ray job submit'"
	$(PY) -m pipeline.localray stop $(DEMO_DIR)/ray >/dev/null
	$(PY) -m pipeline.localray start $(DEMO_DIR)/ray --port $(DEMO_RAY_PORT) --dashboard-port $(DEMO_DASHBOARD_PORT)
	eval "$$($(PY) -m pipeline.localray env $(DEMO_DIR)/ray)"; \
	trap '$(PY) -m pipeline.localray stop $(DEMO_DIR)/ray' EXIT; \
	$(VENV)/bin/ray job submit --working-dir "$$($(PY) -m pipeline.jobdir $(DEMO_DIR)/job)" \
	  --runtime-env-json '{"env_vars": {"HF_HUB_OFFLINE": "1"}}' -- \
	  python -m pipeline.extract_teachers --data-path $(DEMO_DIR)/data/blip_laion_cc_sbu_558k.json \
	    --image-folder $(DEMO_DIR)/data/images --output $(DEMO_DIR)/store \
	    --teachers-manifest $(DEMO_DIR)/teachers/teachers.yaml --shard-size 16 --batch-size 8 --no-progress
	@echo "== 4/7 what the store holds"
	$(PY) -m pipeline.inspect $(DEMO_DIR)/store summary
	$(PY) -m pipeline.inspect $(DEMO_DIR)/store verify
	$(PY) -m pipeline.inspect $(DEMO_DIR)/store render --out $(DEMO_DIR)/sample.png
	@echo "== 5/7 tiny LLM (fitted on the captions) and CLIP tower -> $(DEMO)/models"
	$(PY) -m trainer.tiny $(DEMO_DIR)/models --captions $(DEMO_DIR)/data/blip_laion_cc_sbu_558k.json --lm-steps 200
	@echo "== 6/7 PT training from the store ($(DEMO_STEPS) steps; the teachers are never loaded)"
	rm -rf $(DEMO_DIR)/run
	$(PY) -m trainer.pt --store $(DEMO_DIR)/store --config $(DEMO_DIR)/models/pt_tiny.yaml \
	  --teachers-manifest $(DEMO_DIR)/teachers/teachers.yaml --output-dir $(DEMO_DIR)/run --max-steps $(DEMO_STEPS) \
	  --set learning_rate=3e-3
	$(PY) -m trainer.plot $(DEMO_DIR)/run
	@echo "== 7/7 probing the trained model at every layer, for every task, by the authors' protocol (docs/probing.md):"
	@echo "       a training store with the probing targets, an image folder -> an eval store (640x640 first) -> probes"
	rm -rf $(DEMO_DIR)/probe
	$(PY) -m pipeline.extract_teachers --data-path $(DEMO_DIR)/data/blip_laion_cc_sbu_558k.json \
	  --image-folder $(DEMO_DIR)/data/images --output $(DEMO_DIR)/probe/train_store \
	  --teachers-manifest $(DEMO_DIR)/teachers/teachers_probe.yaml --shard-size 8 --batch-size 8 --no-progress
	$(PY) -m pipeline.llava from-images $(DEMO_DIR)/data/images --out $(DEMO_DIR)/probe/eval.json
	$(PY) -m pipeline.extract_teachers --data-path $(DEMO_DIR)/probe/eval.json --image-folder $(DEMO_DIR)/data/images \
	  --output $(DEMO_DIR)/probe/eval_store --teachers-manifest $(DEMO_DIR)/teachers/teachers_probe_eval.yaml \
	  --limit 24 --shard-size 8 --batch-size 8 --no-progress
	$(PY) -m trainer.probe --store $(DEMO_DIR)/probe/train_store --eval-store $(DEMO_DIR)/probe/eval_store \
	  --model $(DEMO_DIR)/run/export --teachers-manifest $(DEMO_DIR)/teachers/teachers_probe.yaml \
	  --eval-teachers-manifest $(DEMO_DIR)/teachers/teachers_probe_eval.yaml \
	  --output-dir $(DEMO_DIR)/probe/run --max-steps $(DEMO_PROBE_STEPS) --set global_batch_size=8 \
	  --set micro_batch_size=4 --set num_workers=1 --set learning_rate=3e-3
	@echo
	@echo "demo done: $(DEMO)/store (targets), $(DEMO)/sample.png (a sample and its targets),"
	@echo "           $(DEMO)/run/export (mm_projector.bin, task tokens, predictors), $(DEMO)/run/loss.png,"
	@echo "           $(DEMO)/probe/run/probe_scores.csv and probe_plot.png (cosine per task and layer)"
