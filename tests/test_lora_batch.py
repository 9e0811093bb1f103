"""Mixed-adapter batches: the per-row index against running each adapter separately; the fused Triton kernel
(codegen/templates/lora_batch.py) against a float64 reference in the interpreter; lowered programs end to end."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from codegen.templates import lora_batch as lb
from codegen.testing import guard_intact, guarded, guarded_output, on_device
from rewriter import rewrite
from rewriter.lora_runtime import adapter_index, set_adapter_index, set_adapters
from rewriter.ops.multi_lora_linear import compute
from tests.helpers import LinearStack

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 2e-5, torch.float16: 8e-3, torch.bfloat16: 6e-2}


def _randomize(program, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in program.state_dict.items():
            if "lora_B" in name:
                t.copy_((torch.randn(t.shape, generator=gen) * 0.3).to(t.dtype))
            elif "lora_magnitude" in name:
                t.mul_(1 + 0.3 * torch.rand(t.shape, generator=gen).to(t.dtype))


@st.composite
def batched_programs(draw):
    depth = draw(st.integers(1, 2))
    dims = draw(st.lists(st.integers(2, 20), min_size=depth + 1, max_size=depth + 1))
    torch.manual_seed(draw(st.integers(0, 999)))
    model = LinearStack(dims, draw(st.lists(st.booleans(), min_size=depth, max_size=depth)))
    names = draw(st.lists(st.sampled_from("abcdef"), min_size=1, max_size=4, unique=True))
    specs = [f"lora{{name={n},rank={draw(st.integers(1, 5))},init=gaussian,seed={i},"
             f"dora={str(draw(st.booleans())).lower()}}}" for i, n in enumerate(names)]
    batch = draw(st.integers(1, 6))
    shape = (batch, dims[0]) if draw(st.booleans()) else (batch, draw(st.integers(1, 3)), dims[0])
    rows = draw(st.lists(st.sampled_from(names + [None]), min_size=batch, max_size=batch))
    return model, torch.randn(shape), specs, names, rows


@settings(max_examples=15)
@given(batched_programs())
def test_each_row_gets_its_own_adapter(case):
    model, x, specs, names, rows = case
    result = rewrite(model, (x,), ",".join(specs) + ",lora-batch", verify=True)
    _randomize(result.program)
    alone = {}
    with torch.no_grad():
        for n in names:
            set_adapters(result.program, [n])
            alone[n] = result.module()(x)
        set_adapters(result.program, [])
        alone[None] = result.module()(x)
        set_adapters(result.program, names)
        with adapter_index(result.program, rows):
            mixed = result.module()(x)
        gated = result.module()(x)                      # the index is reset: every active adapter again
        set_adapters(result.program, names)
        assert torch.equal(gated, result.module()(x))
    expected = torch.stack([alone[r][i] for i, r in enumerate(rows)])
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)


def test_index_must_match_the_batch():
    model, x = torch.nn.Linear(4, 3), torch.randn(5, 4)
    result = rewrite(model, (x,), "lora{name=a,rank=2},lora-batch")
    set_adapter_index(result.program, ["a", None])
    with pytest.raises(ValueError, match="has shape \\[2\\]; this layer's input has 5 rows"):
        result.module()(x)


@st.composite
def kernel_cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    m, k, n = draw(st.integers(1, 32)), draw(st.integers(1, 48)), draw(st.integers(1, 32))
    count = draw(st.integers(1, 4))
    ranks = draw(st.lists(st.integers(1, 8), min_size=count, max_size=count))
    mode = draw(st.sampled_from(["dense", "dense", "base"]))
    return dict(dtype=dtype, m=m, k=k, n=n, ranks=ranks, mode=mode, bias=draw(st.booleans()) and mode == "dense",
                xa=draw(st.booleans()), strided=draw(st.booleans()), seed=draw(st.integers(0, 999)),
                rows=draw(st.lists(st.integers(-1, count - 1), min_size=m, max_size=m)))


@settings(max_examples=20)
@given(kernel_cases())
def test_kernel_matches_float64(c):
    gen = torch.Generator().manual_seed(c["seed"])
    r = lambda *s: torch.randn(*s, generator=gen).to(c["dtype"])  # noqa: E731
    x, xa = r(c["m"], c["k"]), r(c["m"], c["k"])
    w = r(c["n"], c["k"]) if c["mode"] == "dense" else None
    base = r(c["m"], c["n"]) if c["mode"] == "base" else None
    bias = r(c["n"]) if c["bias"] else None
    lora_a = [r(rk, c["k"]) * 0.5 for rk in c["ranks"]]
    lora_b = [r(c["n"], rk) * 0.5 for rk in c["ranks"]]
    scales = [0.5 + i for i in range(len(lora_a))]
    slots = torch.tensor(c["rows"])
    out = guarded_output((c["m"], c["n"]), c["dtype"])
    g = lambda t: None if t is None else guarded(t, strided=c["strided"])  # noqa: E731
    lb.launch(g(x), g(w), g(bias), g(base), [g(t) for t in lora_a], [g(t) for t in lora_b], scales,
              on_device(slots), g(xa) if c["xa"] else None, blocks=dict(BM=16, BN=16, BK=16), out=out)
    d = lambda t: None if t is None else t.double()  # noqa: E731
    ids = list(range(len(lora_a)))
    want = compute(d(x), d(w), d(bias), d(base), [d(t) for t in lora_a], [d(t) for t in lora_b], [], "",
                   scales, [1.0] * len(ids), ids, [-1] * len(ids), slots, d(xa) if c["xa"] else None)
    got = out.cpu().double()
    scale = want.abs().max().clamp_min(1.0)
    assert float((got - want).abs().max() / scale) <= TOL[c["dtype"]]
    assert guard_intact(out)


def test_kernel_one_adapter_per_tile_and_no_adapter_rows():
    """64 rows per adapter: each 16-row tile meets one adapter; rows of −1 get the base alone."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(48, 32, generator=gen), torch.randn(24, 32, generator=gen)
    lora_a = [torch.randn(4, 32, generator=gen) for _ in range(3)]
    lora_b = [torch.randn(24, 4, generator=gen) for _ in range(3)]
    slots = torch.tensor([2] * 16 + [-1] * 16 + [0] * 16)[torch.randperm(48, generator=gen)]
    y = lb.launch(*map(on_device, (x, w)), None, None, [on_device(t) for t in lora_a],
                  [on_device(t) for t in lora_b], [1.0, 2.0, 3.0], on_device(slots),
                  blocks=dict(BM=16, BN=16, BK=16)).cpu()
    for i in range(48):
        k = int(slots[i])
        want = x[i] @ w.t() + (0 if k < 0 else (k + 1.0) * (x[i] @ lora_a[k].t()) @ lora_b[k].t())
        torch.testing.assert_close(y[i], want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("structured", ["", "shiftadd{group=8},", "lowrank{rank=4},"])
def test_lowered_program_uses_the_kernel_and_matches(structured):
    torch.manual_seed(0)
    model, x = LinearStack([16, 24, 16], [True, False]), torch.randn(6, 16)
    spec = f"{structured}lora{{name=a,rank=2,init=gaussian}},lora{{name=b,rank=3,init=gaussian,seed=1}},lora-batch"
    plain = rewrite(model, (x,), spec)
    lowered = rewrite(model, (x,), spec, codegen="triton")
    assert [s["kernel"] for s in lowered.report.passes[-1].sites if "lora" in s["kernel"]] == ["lora_batch"] * 2
    _randomize(plain.program)
    with torch.no_grad():
        for name, t in lowered.program.state_dict.items():
            t.copy_(plain.program.state_dict[name])
    for rows in (None, ["a", None, "b", "b", "a", None]):
        set_adapter_index(plain.program, rows)
        set_adapter_index(lowered.program, rows)
        with torch.no_grad():
            torch.testing.assert_close(lowered.module()(x), plain.module()(x), rtol=2e-5, atol=2e-5)


def test_bench_runs_both_sides_on_the_same_weights():
    """bench.lora_batch checks that ours and PEFT's loop agree before timing them."""
    pytest.importorskip("peft")
    from bench.lora_batch import run
    table = run(dims=(32,), rows_per_adapter=(1,), rank=4, repeats=1)
    assert "PEFT loop ÷ ours (op)" in table and table.count("\n") == 2


def test_batched_program_round_trips_through_pt2(tmp_path):
    torch.manual_seed(0)
    model, x = LinearStack([8, 12, 6], [True, False]), torch.randn(4, 8)
    result = rewrite(model, (x,), "lora{name=a,rank=2,init=gaussian},lora{name=b,rank=3,init=gaussian,dora=true},"
                                  "lora-batch{adapters='b,a'}")
    _randomize(result.program)
    rows = ["a", None, "b", "a"]
    with torch.no_grad(), adapter_index(result.program, rows):
        want = result.module()(x)
    path = tmp_path / "batch.pt2"
    result.save(str(path))
    again = torch.export.load(str(path))
    set_adapter_index(again, rows)
    assert again.state_dict["lora_index"].tolist() == [1, -1, 0, 1]      # ids follow lora-batch's order
    with torch.no_grad():
        torch.testing.assert_close(again.module()(x), want)
