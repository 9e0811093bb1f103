"""codegen.select: measured choice between an op's Triton candidates and its aten path, tested without a GPU by
injecting a timer (select.use_timer) — which turns measuring on under the CPU interpreter too.

Covered: the fastest candidate is picked; the choice is reused for every call in the same shape bucket, from
memory and from the on-disk cache in a fresh process; candidates that raise or compute a wrong result are
skipped with a note; REWRITE_KERNELS forces a side (and a bad value is a one-line user error); without a timer
the interpreter runs the template unmeasured; the real rewrite_triton ops dispatch through it; the lowering
report names the winner per site."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import codegen.ops as kops
from codegen import select
from codegen.select import Candidate
from codegen.templates import gemm
from codegen.testing import LaunchSpy, kernel_device, on_device
from rewriter.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")
cpu_only = pytest.mark.skipif(kernel_device().type != "cpu", reason="injected timers on the CPU interpreter")


@pytest.fixture(autouse=True)
def fresh(tmp_path, monkeypatch):
    """Each test: its own kernel cache dir (so its own selection cache), no decisions in memory, auto mode."""
    monkeypatch.setenv("REWRITE_KERNEL_CACHE", str(tmp_path / "kernels"))
    monkeypatch.delenv("REWRITE_KERNELS", raising=False)
    select.clear_memory()
    yield
    select.clear_memory()


class Table:
    """An injected timer: ms per candidate name from a table; records what it timed."""

    def __init__(self, ms: dict):
        self.ms, self.timed = ms, []

    def __call__(self, cand):
        self.timed.append(cand.name)
        return self.ms[cand.name]


def _candidates(runs: list, value=1.0, wrong=(), broken=()):
    """Three triton configurations and two aten paths computing the same tensor (unless listed in wrong /
    broken); `runs` collects the name of every candidate that ran."""
    def make(name, kind):
        def run():
            runs.append(name)
            if name in broken:
                raise RuntimeError(f"out of resource: shared memory, Required: 300000 ({name})")
            return torch.full((4,), value + (1.0 if name in wrong else 0.0))
        return Candidate(name, kind, run)
    return [make("triton[a]", "triton"), make("triton[b]", "triton"), make("triton[c]", "triton"),
            make("aten", "aten"), make("aten-fast", "aten")]


def _dispatch(runs, rows=5, **kw):
    x = torch.empty(rows, 8)
    return select.dispatch("toy", _candidates(runs, **kw), CPU, torch.float16, select.bucket((x,), (0,)))


TIMES = {"triton[a]": 3.0, "triton[b]": 1.0, "triton[c]": 2.0, "aten": 4.0, "aten-fast": 2.5}


def test_fastest_is_picked_measured_once_per_bucket_and_reused():
    timer, runs = Table(TIMES), []
    with select.use_timer(timer):
        _dispatch(runs, rows=5)
        assert sorted(timer.timed) == sorted(TIMES)               # every candidate timed once
        assert runs[-1] == "triton[b]"                            # then the fastest ran
        runs.clear()
        _dispatch(runs, rows=7)                                   # 7 rows → the same bucket (8): no measuring
        _dispatch(runs, rows=8)
        assert runs == ["triton[b]", "triton[b]"] and len(timer.timed) == len(TIMES)
        _dispatch(runs, rows=9)                                   # bucket 16: measured afresh
        assert len(timer.timed) == 2 * len(TIMES)
    (decision,) = [d for d in select.decisions() if d.key["bucket"][0][1] == 8]
    assert decision.winner == "triton[b]" and decision.source == "measured"
    assert decision.summary().startswith("triton[b] 2.50× vs aten")       # best aten 2.5 ms / 1.0 ms


def test_aten_wins_when_it_is_faster():
    timer, runs = Table({**TIMES, "aten-fast": 0.5}), []
    with select.use_timer(timer):
        _dispatch(runs)
    assert runs[-1] == "aten-fast"
    assert select.decisions()[0].summary().startswith("aten-fast (0.5 ms; best triton 0.50×")


def test_broken_and_wrong_candidates_are_skipped_with_a_note():
    timer, runs = Table({**TIMES, "triton[b]": 0.1, "triton[c]": 0.2}), []
    with select.use_timer(timer):
        _dispatch(runs, broken=("triton[b]",), wrong=("triton[c]",))
    decision = select.decisions()[0]
    assert runs[-1] == "aten-fast"          # triton[a] 3.0 ms loses to aten-fast 2.5 ms; b and c were fastest
    assert decision.notes["triton[b]"].startswith("failed: RuntimeError: out of resource")
    assert decision.notes["triton[c]"].startswith("wrong result: max error")
    assert "triton[b]" not in timer.timed and "triton[c]" not in timer.timed
    assert set(decision.timings_ms) == {"triton[a]", "aten", "aten-fast"}


def test_every_triton_candidate_broken_under_forced_triton_runs_aten(monkeypatch):
    timer, runs = Table(TIMES), []
    monkeypatch.setenv("REWRITE_KERNELS", "triton")
    with select.use_timer(timer):
        _dispatch(runs, broken=("triton[a]", "triton[b]", "triton[c]"))
    assert runs[-1] == "aten"               # the safe answer: nothing in the pool works


@pytest.mark.parametrize("forced, winner", [("aten", "aten-fast"), ("triton", "triton[b]"), ("auto", "triton[b]")])
def test_env_forces_a_side(forced, winner, monkeypatch):
    monkeypatch.setenv("REWRITE_KERNELS", forced)
    timer, runs = Table(TIMES), []
    with select.use_timer(timer):
        _dispatch(runs)
    assert runs[-1] == winner
    kinds = {"aten": {"aten", "aten-fast"}, "triton": {"triton[a]", "triton[b]", "triton[c]"}, "auto": set(TIMES)}
    assert set(timer.timed) == kinds[forced]          # only the forced side is measured


def test_forcing_a_side_after_auto_reuses_the_stored_timings(monkeypatch):
    timer, runs = Table({**TIMES, "aten-fast": 0.5}), []
    with select.use_timer(timer):
        _dispatch(runs)
        monkeypatch.setenv("REWRITE_KERNELS", "triton")
        _dispatch(runs)
    assert runs[-1] == "triton[b]" and len(timer.timed) == len(TIMES)


def test_a_settled_choice_is_reused_by_its_signature_key(monkeypatch):
    """dispatch(fast_key=…) — the host fast path the rewrite_triton ops take: once a key's choice is settled
    (measured), later calls with that key run the winner without choosing again; another mode is another key;
    a fallback taken while nothing could be measured is never settled; clear_memory forgets the settled ones."""
    chosen = []
    real_choose = select.choose
    monkeypatch.setattr(select, "choose", lambda *a: chosen.append(a[0]) or real_choose(*a))

    def call(key, runs, rows=5):
        bucket = select.bucket((torch.empty(rows, 8),), (0,))
        return select.dispatch("toy", _candidates(runs), CPU, torch.float16, bucket, fast_key=key)
    timer, runs = Table(TIMES), []
    with select.use_timer(timer):
        for _ in range(3):
            call("k", runs)
        assert runs[-1] == "triton[b]"
        assert len(chosen) == 1                          # chosen once, then the settled winner by name
        monkeypatch.setenv("REWRITE_KERNELS", "aten")
        call("k", runs)
        call("k", runs)
        assert runs[-1] == "aten-fast" and len(chosen) == 2
        monkeypatch.delenv("REWRITE_KERNELS")
        select.clear_memory()
        call("k", runs)
        assert len(chosen) == 3 and runs[-1] == "triton[b]"
    if select.interpreter():            # no timer, nothing stored: the unmeasured default, chosen every call
        chosen.clear()
        call("k2", runs, rows=100)
        call("k2", runs, rows=100)
        assert len(chosen) == 2 and runs[-1] == "triton[a]"


def test_bad_env_value_is_a_one_line_user_error(monkeypatch):
    monkeypatch.setenv("REWRITE_KERNELS", "cuda")
    with pytest.raises(UserError) as e:
        select.mode()
    assert "\n" not in str(e.value) and "auto, triton, aten" in str(e.value)


def test_interpreter_without_timer_runs_the_template_unmeasured(monkeypatch):
    runs = []
    if select.interpreter():
        _dispatch(runs)
        assert runs == ["triton[a]"]                       # the template's default, nothing timed
        monkeypatch.setenv("REWRITE_KERNELS", "aten")
        runs.clear()
        _dispatch(runs)
        assert runs == ["aten"]
    assert select.decisions() == []


def test_decision_is_written_atomically_and_read_back_in_a_fresh_process(tmp_path):
    timer, runs = Table(TIMES), []
    with select.use_timer(timer):
        _dispatch(runs)
    files = list(select.selection_dir().glob("*.json"))
    assert len(files) == 1 and not list(select.selection_dir().glob(".tmp_*"))
    stored = json.loads(files[0].read_text())
    assert stored["winner"] == "triton[b]" and stored["timings_ms"] == TIMES
    assert {"op", "device", "dtype", "bucket", "torch", "triton", "codegen"} <= set(stored["key"])
    script = textwrap.dedent("""
        import torch, sys
        sys.path.insert(0, "tests")
        from codegen import select
        import test_codegen_select as t
        def refuse(c):
            raise AssertionError("measured again: the disk cache was not used")
        runs = []
        with select.use_timer(refuse):
            t._dispatch(runs, rows=6)
        print(runs[-1], select.decisions()[0].source)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["triton[b]", "disk"]


def test_a_corrupt_cache_file_is_measured_again():
    timer, runs = Table(TIMES), []
    with select.use_timer(timer):
        _dispatch(runs)
    (path,) = select.selection_dir().glob("*.json")
    path.write_text("{not json")
    select.clear_memory()
    with select.use_timer(timer):
        _dispatch(runs)
    assert len(timer.timed) == 2 * len(TIMES) and runs[-1] == "triton[b]"


@cpu_only
def test_real_op_dispatches_through_selection(monkeypatch):
    """rewrite_triton::lora_linear under an injected timer: when aten-addmm is timed fastest, later calls launch no
    Triton kernel; when a Triton configuration is, they do — and every result is the reference's."""
    spy = LaunchSpy(gemm.block_gemm_kernel)
    monkeypatch.setattr(gemm, "block_gemm_kernel", spy)
    g = torch.Generator().manual_seed(0)
    x, w, a, bb = (torch.randn(*s, generator=g) for s in ((6, 32), (24, 32), (4, 32), (24, 4)))
    want = x.double() @ w.double().t() + 0.5 * (x.double() @ a.double().t()) @ bb.double().t()
    names = [c.name for c in kops.lora_t.candidates(x, w, None, a, bb, 0.5)]
    for fastest, launches in (("aten-addmm", 0), (names[0], 2)):
        select.clear_memory()
        shutil.rmtree(select.selection_dir(), ignore_errors=True)
        timer = Table({n: (0.1 if n == fastest else 1.0) for n in names})
        with select.use_timer(timer):
            kops.LORA(x, w, None, a, bb, 0.5)               # measures every candidate
            spy.calls.clear()
            y = kops.LORA(x, w, None, a, bb, 0.5)
        assert sorted(timer.timed) == sorted(names)
        assert len(spy.calls) == launches, fastest
        torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)


@cpu_only
def test_lowering_report_names_the_winner_per_site():
    """With a timer (a GPU's, injected here) lowering runs the program once so every site is measured; each site's
    "impl" says which implementation won and by how much over the aten path."""
    from rewriter import rewrite
    from rewriter.demo_models import demo_model
    model, args = demo_model("tiny-gpt")
    base = rewrite(model, args, passes="lora{rank=4}")

    def timer(cand):        # the aten paths are "slower" (2 ms) than any Triton candidate (1 ms)
        return 2.0 if cand.kind == "aten" else 1.0
    with select.use_timer(timer):
        r = rewrite(base.program, args, codegen="triton")
    sites = r.report.passes[-1].sites
    assert sites and all(list(s)[:4] == ["site", "status", "kernel", "impl"] for s in sites)
    lora = [s for s in sites if s["kernel"].startswith("lora_linear")]
    assert len(lora) == 12 and all(" 2.00× vs aten" in s["impl"] for s in lora), lora[0]
    regions = [s for s in sites if s["kernel"].startswith("region_")]
    assert regions and all("vs aten" in s["impl"] for s in regions)


@cpu_only
def test_lowering_report_without_a_timer_says_why_nothing_was_measured():
    from rewriter import rewrite
    from rewriter.demo_models import demo_model
    model, args = demo_model("tiny-gpt")
    r = rewrite(model, args, passes="two-pass-softmax", codegen="triton")
    sites = [s for s in r.report.passes[-1].sites if s["kernel"] == "two_pass_softmax"]
    assert len(sites) == 2          # one attention softmax per block
    want = "triton (interpreter: not measured)" if select.interpreter() else "aten (no GPU)"
    assert all(s["impl"] == want for s in sites)


def _template_calls():
    """(name, candidates list) for a small call of every template, fp32."""
    from codegen import generate
    from codegen.templates import blockdiag_linear as bd_t
    from codegen.templates import monarch_linear as mon_t
    from codegen.templates import shiftadd_linear as sa_t
    from codegen.templates import softmax as sm_t
    from codegen.templates import softplus_attention as sp_t
    from codegen.templates import vq_logits as vq_t
    from rewriter import bcq
    g = torch.Generator().manual_seed(8)
    r = lambda *s: on_device(torch.randn(*s, generator=g) / 3)  # noqa: E731
    signs = on_device(torch.randint(0, 256, (2, 12, bcq.padded_in(40, 16) // 8), generator=g, dtype=torch.uint8))
    exps = on_device(torch.randint(-6, 1, (12, bcq.padded_in(40, 16) // 16, 2, 1), generator=g, dtype=torch.int8))
    code_map = on_device(torch.randint(0, 7, (29,), generator=g))
    spec = json.dumps({"ops": [{"rule": "add", "args": ["i0", "i1"], "kw": {}},
                               {"rule": "sigmoid", "args": ["v0"], "kw": {}}],
                       "reduce": "sum", "keepdim": False, "dtype": "float32"}, sort_keys=True)
    region_inputs = [r(5, 24), r(24)]
    return [
        ("monarch", mon_t.candidates(r(5, 24), r(3, 8, 8), r(3, 6, 8), r(17), 17, "gelu", r(5, 17))),
        ("blockdense", bd_t.candidates(r(5, 24), r(3, 4, 8), r(10, 12), None, 10, "none", r(5, 10))),
        ("lowrank", bd_t.candidates_lowrank(r(2, 3, 24), r(10, 5), r(5, 24), r(10))),
        ("vq", vq_t.candidates(r(5, 16), r(7, 16), code_map, r(29), True)),
        ("shiftadd", sa_t.candidates(r(2, 40), signs, exps, r(12), 40, 16)),
        ("softmax", sm_t.candidates(r(3, 50), -1)),
        ("softplus", sp_t.candidates(r(1, 2, 20, 16), r(1, 2, 20, 16), r(1, 2, 20, 16), None, True, True, 3.0, 0,
                                     1e-6)),
        ("region", generate.candidates(region_inputs, generate.parse_spec(spec), spec)),
    ]


@pytest.mark.parametrize("i", range(8))
def test_every_candidate_of_every_template_computes_its_aten_path(i):
    """Selection may run any candidate: each one (Triton configurations, hybrids) must give what the aten
    candidate gives (fp32, small shapes: exact dots in the interpreter, 1e-4 relative on a GPU)."""
    name, cands = _template_calls()[i]
    aten = [c for c in cands if c.kind == "aten"]
    assert aten and cands[0].kind == "triton", name
    want = aten[0].run().cpu().double()
    for c in cands:
        got = c.run().cpu().double()
        assert got.shape == want.shape, (name, c.name)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"{name}: {c.name}")


@cpu_only
def test_single_launch_ops_registered_the_old_way_go_through_selection():
    """kops._kernel_or_reference (one template launch vs its reference) is a two-candidate selection."""
    x = torch.randn(6, 4)
    runs = []
    launch = lambda: runs.append("triton") or x * 2  # noqa: E731
    reference = lambda: runs.append("aten") or x * 2  # noqa: E731
    with select.use_timer(lambda c: 1.0 if c.kind == "aten" else 3.0):
        kops._kernel_or_reference("toy_single", None, [x], x.numel(), launch, reference)
        runs.clear()
        y = kops._kernel_or_reference("toy_single", None, [x], x.numel(), launch, reference)
    assert runs == ["aten"] and torch.equal(y, x * 2)
    runs.clear()
    x64 = torch.randn(6, 4, dtype=torch.float64)
    with select.use_timer(lambda c: 1.0 if c.kind == "triton" else 3.0):    # the template would win…
        kops._kernel_or_reference("toy_single", "dtype float64 has no kernel", [x64], x64.numel(), launch, reference)
    assert runs == ["aten"]                 # …but a refusal runs the reference without selecting
