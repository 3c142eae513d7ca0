# The two everyday commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# These two versions are the ones the project's machines hold locally; requirements.txt states the real ranges.
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
# The wheel index torch and torchvision come from; empty: pip's own (PyPI, or what pip.conf names). PyPI's Linux
# torch brings CUDA: `make venv TORCH_INDEX=https://download.pytorch.org/whl/cpu` is the CPU-only install.
TORCH_INDEX ?=

.PHONY: demo demo-detection demo-segmentation test test-fast gpu-check venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH_PIN)
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt $(TORCH_PIN)
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

# Two pytest workers that steal work from each other: most tests wait on subprocess start-up or run on one thread,
# so two cores finish the suite in about 5 minutes (a cold torch.compile cache included; 4:48 measured on a 2-core
# AMD EPYC from a fresh clone).
test: venv
	$(PY) -m pytest -q -n 2 --dist worksteal tests

# The inner loop: every test not marked slow (pytest.ini), in under a minute on 2 cores. `make test` runs them all.
test-fast: venv
	$(PY) -m pytest -q -n 2 --dist worksteal -m "not slow" tests

# On a machine with a CUDA GPU: golden fixtures, fp16/bf16 training steps, 1- vs 2-GPU evaluation, every detector's
# training step and inference, benchmark
# (tools/gpu_check.py). Fails with one line and exit status 2 where there is no GPU.
gpu-check: venv
	$(PY) -m tools.gpu_check

# Generate the demo dataset, train the demo model from scratch on it, evaluate the last checkpoint, time it.
DEMO := --cfg configs/demo/focal_demo.yaml --output output/demo
demo: venv
	$(PY) -m data.demo --out demo_data
	rm -rf output/demo
	$(PY) main.py $(DEMO) --data-path demo_data
	$(PY) main.py $(DEMO) --data-path demo_data --eval
	$(PY) main.py $(DEMO) --throughput 5

clean:
	rm -rf $(VENV) output demo_data demo_detection demo_segmentation

# Dense tasks on generated shapes, trained from scratch on the CPU in a few minutes: box/mask AP and mIoU.
# `make demo-detection DETECTOR=atss` (or fcos, cascade_mask_rcnn, sparse_rcnn, reppoints_v2) runs that detector's
# demo config; the default is Mask R-CNN's configs/detection/demo.yaml.
DETECTOR ?=
DETECTION_DEMO := configs/detection/$(if $(DETECTOR),$(DETECTOR)_demo,demo).yaml
demo-detection: venv
	@test -f $(DETECTION_DEMO) || { echo "DETECTOR=$(DETECTOR): no demo config $(DETECTION_DEMO)"; exit 2; }
	$(PY) -m dense.demo --task detection --out demo_detection
	rm -rf output/demo_detection
	$(PY) -m detection.train --cfg $(DETECTION_DEMO) --data-path demo_detection --output output/demo_detection --device cpu

demo-segmentation: venv
	$(PY) -m dense.demo --task segmentation --out demo_segmentation
	rm -rf output/demo_segmentation
	$(PY) -m segmentation.train --cfg configs/segmentation/demo.yaml --data-path demo_segmentation --output output/demo_segmentation --device cpu
