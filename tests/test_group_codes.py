"""Coded per-group scales and offsets (rewriter/group_codes.py, rewrite::group_values): the storage shiftadd's
affine code uses by default (6-bit codes, one fp16 step per 8 groups, group 32: 4.5 bits per weight at 4 bits)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rewriter import bcq, bcq_fit, group_codes, rewrite
from rewriter.decompose import decompose_custom_ops
from rewriter.ops import group_values


def _values(seed, rows, groups, scale_exp, zeros):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(rows, groups, generator=g) * 10.0 ** torch.randint(-scale_exp, 3, (rows, 1), generator=g)
    if zeros:
        v[:, ::3] = 0
    return v


@given(seed=st.integers(0, 2**16), rows=st.integers(1, 5), groups=st.integers(1, 40), bits=st.integers(2, 8),
       signed=st.booleans(), dtype=st.sampled_from([torch.float16, torch.bfloat16]), scale_exp=st.integers(0, 9),
       zeros=st.booleans())
@settings(max_examples=200, deadline=None)
def test_codes_round_trip_and_are_stable(seed, rows, groups, bits, signed, dtype, scale_exp, zeros):
    """decode(encode(v)) is the nearest code value up to the step's rounding; encoding it again gives the same codes
    and steps (so fits can work on decoded values); the packed size is ⌈groups·bits/8⌉ bytes per row."""
    v = _values(seed, rows, groups, scale_exp, zeros)
    c = group_codes.encode(v, bits, signed, dtype)
    assert c.codes.dtype == torch.uint8 and c.codes.shape == (rows, -(-groups * bits // 8))
    assert c.steps.dtype == dtype and c.steps.shape == (rows, max(1, groups // 8))
    d = c.decode()
    assert torch.equal(group_codes.round_trip(v, bits, signed, dtype), d)     # unpacked shortcut, same floats
    again = group_codes.encode(d, bits, signed, dtype)
    assert torch.equal(again.codes, c.codes) and torch.equal(again.steps, c.steps)
    target = v if signed else v.clamp_min(0)
    step = c.steps.float().repeat_interleave(group_codes.groups_per_step(groups), 1)[:, :groups]
    top = group_codes.largest_code(bits, signed)
    # half a step, plus what rounding the step down costs the super-block's largest value (≤ one ulp of the step),
    # or — for values so small their step is below the dtype's smallest subnormal — that subnormal
    subnormal = torch.finfo(dtype).tiny * 2.0 ** -10
    assert ((d - target).abs() <= step * (0.5 + top * 2.0 ** -7) + (top + 1) * subnormal).all()


def test_codes_are_exact_on_their_own_grid_and_documented_bits():
    steps = torch.tensor([[0.5, 0.25]])
    codes = torch.tensor([[0, 1, 2, 63, 5, 6, 7, 8, 9, 63, 9, 1, 2, 3, 4, 5, 6, 7]])
    v = codes.float() * steps.repeat_interleave(9, 1)                  # 18 groups: 2 steps of 9 (not 3 of 8)
    assert group_codes.groups_per_step(18) == 9 and group_codes.groups_per_step(48) == 8
    assert group_codes.groups_per_step(5) == 5 and group_codes.groups_per_step(15) == 15
    assert torch.equal(group_codes.round_trip(v, 6, False), v)
    assert group_codes.encode(v, 6, False).nbytes == 14 + 2 * 2
    # 4 sign bits + 6-bit scale and offset per 32 weights + an fp16 step each per 8 groups = Q4_K's 4.5
    assert 4 + group_codes.bits_per_weight(6, 32) == 4.5
    assert bcq_fit.rtn_bits_per_weight(4, 32, 6) == 4.5 and bcq_fit.rtn_bits_per_weight(3, 32, 6) == 3.5


def test_coded_affine_quantiser_stores_what_it_fitted():
    """bcq.quantize_affine(scale_bits=6): the BCQWeight's scales are its codes' decoded values, nbytes counts the
    codes and steps, and the fit with coded scales is close to the fp16-scale fit at the same group size."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 256, generator=g)
    x = torch.randn(1024, 256, generator=g) * torch.rand(256, generator=g) * 3
    h = x.t() @ x / 1024
    coded = bcq.quantize_affine(w, 4, 32, h, scale_bits=6)
    plain = bcq.quantize_affine(w, 4, 32, h)
    assert torch.equal(coded.scales, coded.scale_codes.decode()) and torch.equal(coded.offsets,
                                                                                 coded.offset_codes.decode())
    assert coded.bits_per_weight == pytest.approx(4.5 + 8 * 4 / w.numel())      # + the 4 shared exponent bytes
    assert plain.bits_per_weight == pytest.approx(5.0 + 8 * 4 / w.numel())
    from rewriter import weighted
    e_coded, e_plain = (weighted.relative_error(w, q.dequantize(), h) for q in (coded, plain))
    assert e_coded <= 1.1 * e_plain
    wide = bcq.quantize_affine(w, 4, 64, h)                                     # fp16 scales, same 4.5 bits
    assert e_coded < weighted.relative_error(w, wide.dequantize(), h)


def test_program_with_coded_scales_saves_loads_and_decomposes(tmp_path, tiny_gpt):
    model, args = tiny_gpt
    r = rewrite(model, args, passes="shiftadd{bits=4,calibrate=4}", verify=True)
    gm = r.program.graph_module
    decoders = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is group_values.OP]
    assert len(decoders) == 2 * 12                                # scales and offsets of 12 layers
    assert not any(t.dtype in (torch.float16, torch.float32) and name.endswith(("bcq_scales", "bcq_offsets"))
                   for name, t in r.program.state_dict.items())
    path = tmp_path / "m.pt2"
    torch.export.save(r.program, path)
    loaded = torch.export.load(path)
    assert torch.equal(loaded.module()(*args), r.module()(*args))
    flat = r.program.module()
    assert decompose_custom_ops(flat, list(args)) > 0
    assert not any(n.op == "call_function" and "rewrite." in str(n.target) for n in flat.graph.nodes)
    assert torch.allclose(flat(*args), r.module()(*args), atol=1e-5)
