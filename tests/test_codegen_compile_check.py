"""codegen.compile_check: every kernel a GPU run launches compiles for the H100 (sm_90) with Triton's real
compiler, here, without a GPU — and the check catches what the interpreter lets through."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from codegen.compile_check import GRID_LIMIT, SHARED_LIMIT

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECTED_KERNELS = {"block_gemm_kernel", "softmax_row_kernel", "softmax_partial_kernel", "softmax_normalize_kernel",
                    "lut_gemv_kernel", "lut_reduce_kernel", "vq_lse_kernel", "vq_gather_kernel",
                    "softplus_attention_kernel", "region_kernel"}

try:
    import triton.backends.nvidia.compiler  # noqa: F401
    HAS_NVIDIA_BACKEND = True
except Exception:
    HAS_NVIDIA_BACKEND = False
needs_backend = pytest.mark.skipif(not HAS_NVIDIA_BACKEND, reason="this Triton has no NVIDIA backend")


def _compiler_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["REWRITE_KERNEL_CACHE"] = str(tmp_path / "kernels")
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton")
    env["PYTHONPATH"] = ROOT + os.pathsep + str(tmp_path)
    return env


@needs_backend
def test_every_kernel_compiles_for_sm90_within_limits(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "codegen.compile_check", "--quick", "--json", "--arch", "90"],
                          cwd=ROOT, env=_compiler_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    report = json.loads(proc.stdout)
    rows = report["kernels"]
    assert {r["kernel"] for r in rows} >= EXPECTED_KERNELS
    assert report["failed"] == 0
    for r in rows:
        assert r["ok"] and r["arch"] == "sm_90", r
        assert r["regs"] is None or 0 < r["regs"] <= 255, r
        assert 0 <= r["shared_bytes"] <= SHARED_LIMIT[90], r
        assert all(g <= lim for g, lim in zip(r["grid"], GRID_LIMIT)), r
    # the GEMM template is compiled in every candidate configuration selection may pick, with GPU (not
    # interpreter) tiles: 128×256 and 128×128 with K step 64 among them, the LoRA adapter loop and the
    # cuBLAS-epilogue variant (HAS_C) too
    gemm = {r["spec"] for r in rows if r["kernel"] == "block_gemm_kernel" and "float16" in r["spec"]}
    assert len(gemm) >= 8
    assert any("BM=128,BN=256,BK=64" in s for s in gemm) and any("BM=128,BN=128,BK=64" in s for s in gemm)
    assert any("HAS_EXTRA=True" in s for s in gemm) and any("HAS_C=True" in s for s in gemm)


BAD_KERNEL = '''
import triton
import triton.language as tl


@triton.jit
def small_dot_kernel(a_ptr, b_ptr, c_ptr, BM: tl.constexpr, BK: tl.constexpr):
    r = tl.arange(0, BM)
    k = tl.arange(0, BK)
    a = tl.load(a_ptr + r[:, None] * BK + k[None, :])
    b = tl.load(b_ptr + k[:, None] * BM + r[None, :])
    tl.store(c_ptr + r[:, None] * BM + r[None, :], tl.dot(a, b))
'''


@needs_backend
def test_the_check_catches_what_the_interpreter_accepts(tmp_path):
    """A tl.dot with K = 8 runs (correctly) in the interpreter but does not compile for a GPU (K ≥ 16); a grid
    with 70 000 programs on axis 1 compiles but would not launch (axis 1 ≤ 65 535)."""
    (tmp_path / "small_dot.py").write_text(BAD_KERNEL)
    interp = textwrap.dedent("""
        import torch, small_dot
        a = torch.randn(16, 8, dtype=torch.float16); b = torch.randn(8, 16, dtype=torch.float16)
        c = torch.empty(16, 16)
        small_dot.small_dot_kernel[(1,)](a, b, c, BM=16, BK=8)
        assert torch.allclose(c, a.float() @ b.float(), atol=1e-3)
        print("interpreter ok")
    """)
    env = _compiler_env(tmp_path)
    proc = subprocess.run([sys.executable, "-c", interp], env={**env, "TRITON_INTERPRET": "1"}, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "interpreter ok" in proc.stdout, proc.stderr[-2000:]
    check = textwrap.dedent("""
        import json, torch, small_dot
        from codegen.compile_check import Launch, compile_one
        a = torch.empty(16, 16, dtype=torch.float16); b = torch.empty(16, 16, dtype=torch.float16)
        c = torch.empty(16, 16)
        k8 = compile_one(Launch(small_dot.small_dot_kernel, (a, b, c), dict(BM=16, BK=8), (1,), "K=8"), 90)
        k16 = compile_one(Launch(small_dot.small_dot_kernel, (a, b, c), dict(BM=16, BK=16), (1,), "K=16"), 90)
        wide = compile_one(Launch(small_dot.small_dot_kernel, (a, b, c), dict(BM=16, BK=16), (1, 70000), "wide"), 90)
        print(json.dumps([k8.row(), k16.row(), wide.row()]))
    """)
    proc = subprocess.run([sys.executable, "-c", check], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    k8, k16, wide = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not k8["ok"] and "K >= 16" in k8["problems"][0]
    assert k16["ok"] and k16["problems"] == [] and k16["shared_bytes"] is not None
    assert not wide["ok"] and wide["problems"] == ["grid[1] = 70000 > 65535"]


def test_unknown_arch_is_refused_by_the_argument_parser(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "codegen.compile_check", "--arch", "12"], cwd=ROOT,
                          env=_compiler_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "invalid choice: 12" in proc.stderr and "Traceback" not in proc.stderr


def test_refuses_to_run_under_the_interpreter(tmp_path):
    env = {**_compiler_env(tmp_path), "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "codegen.compile_check", "--quick"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "TRITON_INTERPRET" in proc.stderr


def test_a_candidate_over_a_limit_is_skipped_not_failed_unless_all_are():
    from codegen.compile_check import Launch, Result, prune_candidates

    def result(group, problems=(), error=""):
        launch = Launch(kernel=None, args=(), kwargs={}, grid=(1,), case="c", tuned_group=group)
        return Result(launch, 80, ok=not problems and not error, error=error, problems=list(problems))

    over = ["shared memory 204800 B > 166912 B per block on sm_80"]
    fits, big, broken = result((0, 0)), result((0, 0), over), result((0, 0), error="CompilationError: K >= 16")
    alone_big, plain_big = result((7, 0), over), result(None, over)
    prune_candidates([fits, big, broken, alone_big, plain_big])
    assert big.ok and big.pruned                     # another candidate of its call fits: selection skips it
    assert not broken.ok                             # a compile error is never skipped
    assert not alone_big.ok and not alone_big.pruned     # every config of its call is over: a real failure
    assert not plain_big.ok                          # a plain launch has no alternative
