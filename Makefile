# SkyPrompt developer commands. `make help` lists them.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
DEBIAN_PACKAGES := python3-qgis qgis-providers python3-gdal gdal-bin python3-venv xvfb
SETUP_STAMP := $(VENV)/.skyprompt-setup
PROTO_SRC := proto/skyprompt/v1/skyprompt.proto
PROTO_STAMP := build/.proto-stamp
export QT_QPA_PLATFORM ?= offscreen

.PHONY: help setup check-debian proto test bench clean train-default train-default-stage2 train-default-stage3 train-default-stage4 train-default-stage5 train-default-stage6 train-default-stage7 train-default-stage8 average-default pack-default train-default-gpu train-default-gpu-bank ablate-recipe refine-default serve plugin-zip screenshots gpu-check
TRAIN_STEPS ?= 1200
# test processes side by side (pytest-xdist); 0 runs the suite in this one process
TEST_WORKERS ?= 2

help:
	@echo "make setup   create .venv (system site packages), install pinned deps, build gRPC stubs"
	@echo "make test    run the whole test suite (runs setup first when needed; TEST_WORKERS=2 processes)"
	@echo "make bench   run the benchmarks; tables printed, results in bench/results/"
	@echo "make gpu-check  on a CUDA machine: the GPU tests, the GPU benchmark and the training-data benchmark (GPU_PY=python with CUDA torch)"
	@echo "make proto   regenerate the gRPC stubs from proto/"
	@echo "make train-default  stage 1 of the CPU-trained checkpoints (small preset, training/recipes/default.json) into runs/default"
	@echo "make train-default-stage2  continue it for 1,000 steps"
	@echo "make train-default-stage3  then 2,000 steps with the class-aware loss"
	@echo "make train-default-stage4  then 800 more class-aware steps (init: runs/default-stage3/fp16)"
	@echo "make train-default-stage5  then 1,000 more (init: runs/default-stage4/fp16, the stage-4 default)"
	@echo "make train-default-stage6  then 1,000 more (init: runs/default-stage5/fp16, the stage-5 weights)"
	@echo "make train-default-stage7  then 1,000 steps with 30% template mixing (init: runs/default-stage7/init)"
	@echo "make train-default-stage8  then 300 steps without template mixing (init: runs/default-stage7/fp16)"
	@echo "make average-default       the mean of the stage-5 and stage-6 weights (a CPU-trained default) -> runs/default-stage7/init"
	@echo "make pack-default          the default recipe's training split, resized, in runs/pack (to copy to a GPU machine)"
	@echo "make train-default-gpu     the default checkpoint: one run from scratch on one GPU, on runs/pack (GPU_PY=...)"
	@echo "make train-default-gpu-bank  the same with the images in a bank on the GPU, GPU_MINUTES of training"
	@echo "make ablate-recipe         train each recipe variant from scratch and tabulate (runs/ablation/results.md)"
	@echo "make refine-default        pseudo-label refinement of the default checkpoint (runs/refine)"
	@echo "make serve   start the backend on 127.0.0.1:50051 with the bundled checkpoint (SERVE_ARGS=... for more)"
	@echo "make plugin-zip  build dist/skyprompt.zip, the QGIS plugin to install"
	@echo "make screenshots  redraw the README screenshot of the plugin (docs/images/)"
	@echo "make clean   remove build output (keeps .venv)"

check-debian:
	@missing=""; for p in $(DEBIAN_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "Missing Debian packages:$$missing"; \
	  echo "Install them with:  sudo apt-get update && sudo apt-get install -y $(DEBIAN_PACKAGES)"; \
	  exit 1; \
	fi

$(SETUP_STAMP): pyproject.toml | check-debian
	test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	# torch first and alone, pinned, from pip's configured index (which here serves the CPU wheel).
	# Where that index serves the CUDA build of that version (PyPI does), point it at the CPU wheels:
	# make setup TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
	$(PY) -m pip install --quiet $(TORCH_PIP_ARGS) "torch==2.13.0" "numpy<2"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

$(PROTO_STAMP): $(PROTO_SRC) tools/build_proto.py $(SETUP_STAMP)
	$(PY) tools/build_proto.py
	@mkdir -p build && touch $@

setup: check-debian $(SETUP_STAMP) $(PROTO_STAMP)

proto: $(SETUP_STAMP)
	$(PY) tools/build_proto.py
	@mkdir -p build && touch $(PROTO_STAMP)

test: setup
	$(PY) -m pytest -p no:cacheprovider -n $(TEST_WORKERS)

bench: setup
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	$(PY) -m bench.run

# The default checkpoint: `small` with a conv stem, trained at 128 px on rsscn7 + ucm + aid (the
# recipe holds out validation splits). Resumable: run it again to continue after an interruption.
train-default: setup
	$(PY) -m training.train --recipe training/recipes/default.json --preset small --conv-stem \
	    --image-size 128 --steps $(TRAIN_STEPS) --batch-size 64 --lr 5e-4 --warmup-steps 100 --caption-weight 1.0 \
	    --save-every 50 --keep-last 2 --eval-every 400 --workers 1 --out runs/default \
	    --export-fp16 runs/default/fp16 --resume

# Stage 2 continues stage 1 for 1,000 more steps on the same recipe and split (a new warm-up +
# cosine cycle at a lower peak learning rate).
train-default-stage2: setup
	$(PY) -m training.train --recipe training/recipes/default.json --init-checkpoint runs/default/checkpoints/step_0001200 \
	    --image-size 128 --steps 1000 --batch-size 64 --lr 3e-4 --warmup-steps 50 --caption-weight 1.0 \
	    --save-every 50 --keep-last 2 --eval-every 500 --workers 1 --out runs/default-stage2 \
	    --export-fp16 runs/default-stage2/fp16 --resume

# Stage 3 continues stage 2 for 2,000 steps with the class-aware contrastive loss (same-class
# pairs are positives).
train-default-stage3: setup
	$(PY) -m training.train --recipe training/recipes/default.json --init-checkpoint runs/default-stage2/fp16 \
	    --image-size 128 --steps 2000 --batch-size 64 --lr 3e-4 --warmup-steps 50 --caption-weight 1.0 --class-aware \
	    --save-every 100 --keep-last 2 --eval-every 1000 --workers 1 --out runs/default-stage3 \
	    --export-fp16 runs/default-stage3/fp16 --resume

# Stage 4 continues stage 3 for 800 more class-aware steps (a new warm-up + cosine cycle, lower peak lr).
train-default-stage4: setup
	$(PY) -m training.train --recipe training/recipes/default.json --init-checkpoint runs/default-stage3/fp16 \
	    --image-size 128 --steps 800 --batch-size 64 --lr 2e-4 --warmup-steps 30 --caption-weight 1.0 --class-aware \
	    --save-every 50 --keep-last 2 --eval-every 800 --workers 1 --out runs/default-stage4 \
	    --export-fp16 runs/default-stage4/fp16 --resume

# Stage 5 continues stage 4 (the default before it) for 1,000 more class-aware steps at a lower peak lr.
train-default-stage5: setup
	$(PY) -m training.train --recipe training/recipes/default.json --init-checkpoint runs/default-stage4/fp16 \
	    --image-size 128 --steps 1000 --batch-size 64 --lr 1.5e-4 --warmup-steps 20 --caption-weight 1.0 --class-aware \
	    --save-every 50 --keep-last 2 --eval-every 500 --workers 1 --out runs/default-stage5 \
	    --export-fp16 runs/default-stage5/fp16 --resume

# Stage 6 continues stage 5 for 1,000 more class-aware steps at a lower peak lr (the stage-5 weights are
# not shipped: the bundled default is now the GPU run, so run stages 1 to 5 first).
train-default-stage6: setup
	$(PY) -m training.train --recipe training/recipes/default.json --init-checkpoint runs/default-stage5/fp16 \
	    --image-size 128 --steps 1000 --batch-size 64 --lr 1.2e-4 --warmup-steps 20 --caption-weight 1.0 --class-aware \
	    --save-every 50 --keep-last 2 --eval-every 500 --workers 1 --out runs/default-stage6 \
	    --export-fp16 runs/default-stage6/fp16 --resume

# Stage 7 continues the stage-5/6 average (`make average-default` writes it to runs/default-stage7/init) for
# 1,000 class-aware steps with caption dropout to class templates (30%).
train-default-stage7: setup
	$(PY) -m training.train --recipe training/recipes/default.json --init-checkpoint runs/default-stage7/init \
	    --image-size 128 --steps 1000 --batch-size 64 --lr 1.2e-4 --warmup-steps 20 --caption-weight 1.0 --class-aware \
	    --template-mix 0.3 --save-every 50 --keep-last 2 --eval-every 1000 --workers 1 --out runs/default-stage7 \
	    --export-fp16 runs/default-stage7/fp16 --resume

# Stage 8 continues stage 7 for 300 class-aware steps without template mixing (the same recipe),
# at a low peak lr, so the caption decoder forgets the templates. Its fp16 export was the default checkpoint
# until the one-GPU run below (README model card, "History").
train-default-stage8: setup
	$(PY) -m training.train --recipe training/recipes/default.json --init-checkpoint runs/default-stage7/fp16 \
	    --image-size 128 --steps 300 --batch-size 64 --lr 8e-5 --warmup-steps 10 --caption-weight 1.0 --class-aware \
	    --save-every 50 --keep-last 2 --eval-every 300 --workers 1 --out runs/default-stage8 \
	    --export-fp16 runs/default-stage8/fp16 --resume

# A CPU-trained default was the uniform average of the stage-5 and stage-6 weights; stage 7 starts from it
# (README model card, "History").
average-default: setup
	$(PY) -m training.export runs/default-stage5/fp16 runs/default-stage7/init --average runs/default-stage6/fp16 --fp16

# The default checkpoint: one run from scratch on one GPU (README model card) on a packed copy of the default
# recipe's training split (held-out images stay behind): `make pack-default` here, copy runs/pack to the GPU
# machine (or pack there), then `make train-default-gpu GPU_PY=python3` there. The shipped run had
# `--time-budget 5.5` on one H100, which fitted 3,114 steps; --steps 3114 repeats its length.
pack-default: setup
	$(PY) -m training.pack --recipe training/recipes/default.json --out runs/pack --size 128

train-default-gpu:
	$(GPU_PY) -m training.train --recipe runs/pack/recipe.json --preset small --conv-stem --image-size 128 \
	    --tokenizer backend/checkpoints/default/tokenizer.json --steps 3114 --batch-size 256 --lr 8e-4 \
	    --warmup-steps 400 --caption-weight 1.0 --class-aware --template-mix 0.15 --device cuda --precision bf16 \
	    --workers 14 --save-every 500 --keep-last 2 --log-every 100 --out runs/default-gpu \
	    --export-fp16 runs/default-gpu/fp16 --resume

# The same recipe with the images in a bank on the GPU (--images-on-device) and a time budget in minutes
# (GPU_MINUTES): the schedule is fitted to the pace the bank allows. Not the default's recipe yet.
GPU_MINUTES ?= 5.5
train-default-gpu-bank:
	$(GPU_PY) -m training.train --recipe runs/pack/recipe.json --preset small --conv-stem --image-size 128 \
	    --tokenizer backend/checkpoints/default/tokenizer.json --steps 20000 --time-budget $(GPU_MINUTES) \
	    --batch-size 256 --lr 8e-4 --warmup-steps 400 --caption-weight 1.0 --class-aware --template-mix 0.15 \
	    --device cuda --precision bf16 --images-on-device --workers 6 --save-every 1000 --keep-last 2 \
	    --log-every 100 --out runs/default-gpu-bank --export-fp16 runs/default-gpu-bank/fp16 --resume

# Recipe ablation (README model card): each variant of the default recipe trained from scratch for
# ABLATION_STEPS steps and scored on the validation split; table in runs/ablation/results.md.
ABLATION_STEPS ?= 250
ablate-recipe: setup
	$(PY) -m training.ablate --out runs/ablation --steps $(ABLATION_STEPS)

# Pseudo-label refinement of the default checkpoint's dense path (README "Localization"): 4 rounds of
# 200 steps, mosaics of 2 regions, labels from SAO maps at 2x zoom, global embeddings held at the start's
# (--keep-global 50: zero-shot within a point from the GPU-trained default; the gain stops after round 4,
# run G); per-round metrics in runs/refine/metrics.jsonl.
refine-default: setup
	$(PY) -m training.refine --checkpoint backend/checkpoints/default --recipe training/recipes/default.json \
	    --rounds 4 --steps-per-round 200 --batch-size 32 --dense-batch 16 --mosaics-per-round 512 --regions 2 --lr 5e-5 \
	    --label-zoom 2 --keep-global 50 --out runs/refine --export-fp16 runs/refine/fp16

serve: setup
	$(PY) -m backend serve $(SERVE_ARGS)

# The CUDA paths on a GPU machine: tests/test_gpu.py (with the model and checkpoint tests) and the GPU
# benchmark. The .venv holds the CPU torch build, so point GPU_PY at a Python whose torch has CUDA;
# the GPU tests need neither GDAL nor QGIS.
GPU_PY ?= $(PY)
gpu-check:
	$(GPU_PY) -m pytest -p no:cacheprovider -p no:qgis -rs tests/test_gpu.py tests/test_model.py tests/test_checkpoint.py
	$(GPU_PY) -m bench.gpu_bench
	$(GPU_PY) -m bench.training_data_bench

clean:
	rm -rf build dist backend/rpc plugin/rpc .pytest_cache
	find . -name __pycache__ -prune -exec rm -rf {} +

plugin-zip: setup
	$(PY) tools/build_plugin_zip.py

screenshots: setup
	xvfb-run -a $(PY) tools/screenshots.py
