# `make demo` and `make test` work on a fresh machine: the first call builds .venv.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch (a plain `torch` would pull a multi-GB CUDA build); pyproject keeps a range.
TORCH_PIN ?= torch==2.13.0
# Real volumes used by the demo and tests ship inside these wheels: installed without
# their (heavy, unused) dependencies.
DATA_PKGS := nilearn==0.14.1 nimare==0.22.1 pydicom-data==1.0.0

.PHONY: install test test-quick lint demo clean gpu-wheels

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps $(DATA_PKGS)
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q

# The edit loop: everything but the slow and multi-process tests (under 2 minutes).
test-quick: install
	$(BIN)/python -m pytest -q -m "not slow and not ddp"

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy medvol

demo: install
	$(BIN)/medvol demo --out demo_out

# The wheels benchmarks/gpu_check.sh installs on a lent GPU machine, which has no network and
# has python3 with a CUDA torch, numpy, scipy, scikit-image, h5py, PyYAML, tqdm, matplotlib,
# einops and imageio: what medvol imports at run time besides those (monai, nibabel; pydicom for
# DICOM and isal, a faster gzip, both imported only when used), what its CUDA tests need
# (pytest and its dependencies) and setuptools to install medvol from the tree. The versions
# are those of .venv, for CPython 3.12 on x86-64 Linux. SimpleITK is left out (a 52.8 MB
# wheel): medvol imports it only to read MetaImage/NRRD files and compressed DICOM, which the
# check does not read.
GPU_WHEELS := monai nibabel pydicom isal pytest pluggy iniconfig pygments setuptools
GPU_WHEEL_DIR := .gpu-wheels

gpu-wheels: install
	rm -rf $(GPU_WHEEL_DIR)
	$(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d $(GPU_WHEEL_DIR) $$($(BIN)/python -c "import importlib.metadata as m, sys; \
		print(' '.join(f'{p}=={m.version(p)}' for p in sys.argv[1:]))" $(GPU_WHEELS))
	@ls -1 $(GPU_WHEEL_DIR)
	@du -sb $(GPU_WHEEL_DIR) | awk '{printf "%s: %.1f MiB of the 64 MiB that travels with the tree\n", $$2, $$1 / 1048576}'

clean:
	rm -rf $(VENV) demo_out .pytest_cache
