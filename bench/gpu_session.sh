#!/usr/bin/env bash
# One GPU session, in one go (~10 minutes on an H100/H200): the kernel tests compiled on the GPU, the kernel
# bench (template / aten / selected per op) and the end-to-end GPT bench, fp16 and bf16. Everything lands in
# $OUT (default ./gpu-session): JSON figures, logs, the selection cache (which candidate won where) and the
# machine's versions. Each stage has its own time limit so one slow stage cannot eat the others.
#
#     OUT=/some/dir bash bench/gpu_session.sh            (PYTHON: the interpreter with CUDA torch; default python3)
#
# Stages (limits in seconds): versions → make test-gpu (150) → bench.kernels (240) → bench.e2e (210): the GPT with
# the two passes the issue measured end to end (LoRA r 16, Monarch b 4) and softplus attention, fp16 then bf16.
set -u
OUT="${OUT:-gpu-session}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
export REWRITE_KERNEL_CACHE="$OUT/kernel-cache"          # generated kernels + the selection decisions
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$OUT/triton-cache}"
unset TRITON_INTERPRET

stage() {   # stage NAME LIMIT CMD...: run with a time limit, log to $OUT/NAME.log, record rc and seconds
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout --signal=INT --kill-after=20 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "{\"stage\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - start))}" >>"$OUT/stages.jsonl"
    echo "$name: rc=$rc in $((SECONDS - start)) s (log: $OUT/$name.log)"
}

"$PYTHON" - >"$OUT/versions.json" <<'PY'
import json, platform, torch
try:
    import triton
    tv = triton.__version__
except Exception:
    tv = None
print(json.dumps(dict(gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                      torch=torch.__version__, cuda=torch.version.cuda, triton=tv,
                      python=platform.python_version()), indent=1))
PY
cat "$OUT/versions.json"

# REWRITE_KERNELS=triton: op-level tests exercise the kernels even where selection would pick the aten path
# (the two halves of the Makefile's test-gpu recipe, each with its own time limit)
stage test-gpu 150 env REWRITE_KERNELS=triton REWRITE_TEST_DEVICE=cuda TRITON_INTERPRET=0 \
    "$PYTHON" -m pytest -q -p no:xdist tests/test_codegen_*.py
# every pass on CUDA-resident random and demo models (API, CLI, torch.compile, lowered), selection on auto
stage fuzz-gpu 120 env REWRITE_TEST_DEVICE=cuda TRITON_INTERPRET=0 \
    "$PYTHON" -m pytest -q -p no:xdist -x tests/test_fuzz_api.py tests/test_fuzz_compile.py tests/test_devices.py
# each row is appended to a .jsonl file as soon as it is measured: a stage cut short keeps what it measured; the
# markdown tables go to the logs
stage kernels 240 "$PYTHON" -m bench.kernels --out "$OUT/kernels.jsonl"
stage e2e 210 "$PYTHON" -m bench.e2e --out "$OUT/e2e.jsonl" --passes "lora{rank=16}" \
    --passes "monarch{blocks=4,exclude=lm_head}" --passes softplus-attn
ls -la "$OUT"
