"""The GEMM template (codegen/templates/gemm.py) directly: the TMA variant (tma_gemm_kernel, Hopper's descriptor
loads; the interpreter runs tensor descriptors too) computes what the pointer kernel does, epilogue included, and
is used only where its operand rules hold; the grouped, block-innermost program order covers every tile once.
Interpreter: tiny shapes, ≤ 4 programs; on a GPU (REWRITE_TEST_DEVICE) the same checks run compiled."""
import pytest
import torch

from codegen.templates import gemm
from codegen.templates.gemm import Tiles
from codegen.testing import LaunchSpy, kernel_device, on_device


def _problem(m, n, k, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: (torch.randn(*s, generator=g) / 4).half()  # noqa: E731
    return mk(m, k), mk(n, k), mk(m, r), mk(n, r), mk(n), mk(m, n)


def _emulated(x, w, h, u, b, res):
    """fp32 accumulation of fp16 operands, in float64: x·wᵀ + h·uᵀ + b, GELU (tanh), + res."""
    d = lambda t: t.double()  # noqa: E731
    y = d(x) @ d(w).t() + d(h) @ d(u).t() + d(b)
    y = torch.nn.functional.gelu(y, approximate="tanh")
    return y + d(res)


@pytest.mark.parametrize("ws", [False, True])
def test_tma_variant_matches_the_formula(ws, monkeypatch):
    dev = kernel_device()
    if dev.type == "cuda" and torch.cuda.get_device_capability(dev)[0] < 9:
        pytest.skip("TMA descriptors need a Hopper (sm_90+) GPU")
    spy = LaunchSpy(gemm.tma_gemm_kernel)
    monkeypatch.setattr(gemm, "tma_gemm_kernel", spy)
    x, w, h, u, b, res = _problem(37, 40, 48, 5)                 # K·2 bytes = 96: rows 16-byte aligned
    y = torch.empty(37, 40, dtype=torch.float32, device=on_device(x).device)
    gemm.launch(on_device(x), on_device(w).unsqueeze(0), y, M_out=40, extra=(on_device(h), on_device(u)),
                bias=on_device(b), activation=2, residual=on_device(res), tiles=Tiles(16, 32, 16, tma=True, ws=ws))
    assert len(spy.calls) == 1 and spy.calls[0]["WS"] is ws
    want = _emulated(x, w, h, u, b, res)
    assert (y.cpu().double() - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_tma_tiles_fall_back_to_the_pointer_kernel_where_descriptors_do_not_apply(monkeypatch):
    """K·2 bytes = 40 is not a multiple of 16 (a descriptor's row stride must be): the pointer kernel runs."""
    tma = LaunchSpy(gemm.tma_gemm_kernel)
    plain = LaunchSpy(gemm.block_gemm_kernel)
    monkeypatch.setattr(gemm, "tma_gemm_kernel", tma)
    monkeypatch.setattr(gemm, "block_gemm_kernel", plain)
    x, w, *_ = _problem(8, 16, 20, 1)
    y = torch.empty(8, 16, dtype=torch.float16, device=on_device(x).device)
    gemm.launch(on_device(x), on_device(w).unsqueeze(0), y, M_out=16, tiles=Tiles(16, 16, 16, tma=True))
    assert not tma.calls and len(plain.calls) == 1
    torch.testing.assert_close(y.cpu().float(), x.float() @ w.float().t(), rtol=1e-2, atol=1e-2)


def test_candidate_tiles_offer_tma_only_for_low_precision_plain_gemms_off_the_interpreter(monkeypatch):
    monkeypatch.setattr(gemm, "interpreter", lambda: False)
    with_tma = gemm.candidate_tiles(4096, 4096, 4096, torch.float16, tma=True)
    assert [t for t in with_tma if t.tma] and any(t.ws for t in with_tma)
    assert not [t for t in gemm.candidate_tiles(4096, 4096, 4096, torch.float32, tma=True) if t.tma]
    assert not [t for t in gemm.candidate_tiles(4096, 4096, 4096, torch.float16) if t.tma]
    names = [t.name for t in with_tma]
    assert len(set(names)) == len(names) and "128x256x64w8s3-tma-ws" in names


@pytest.mark.parametrize("nb, out_mode", [(3, gemm.OUT_PLAIN), (4, gemm.OUT_P2)])
def test_block_innermost_grouped_order_writes_every_tile_once(nb, out_mode):
    """Identity blocks, several row and column tiles per block, GROUP_M 2 over 3 row tiles (a short last
    group): every output element is written once with its own value (a program mapped twice or skipped shows)."""
    rows, t = 40, 24
    x = torch.arange(rows * nb * t, dtype=torch.float32).reshape(rows, nb * t) / 100
    eye = torch.eye(t).expand(nb, t, t).contiguous()
    y = on_device(torch.full((rows, nb * t), -1.0))
    gemm.launch(on_device(x), on_device(eye), y, M_out=nb * t, out_mode=out_mode, tiles=Tiles(16, 16, 16, GROUP_M=2))
    want = x.view(rows, nb, t)
    want = want.reshape(rows, nb * t) if out_mode == gemm.OUT_PLAIN else want.transpose(1, 2).reshape(rows, -1)
    torch.testing.assert_close(y.cpu(), want, rtol=0, atol=1e-6)
