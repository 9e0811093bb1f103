"""lora-combine against PEFT's add_weighted_adapter, method by method, to 1e-6.

DARE's masks are random: the comparison records the Bernoulli masks PEFT draws (torch.bernoulli, in its order:
per layer the A's, then the B's) and hands the same masks to rewriter.lora_combine.combine (`draw=`); the pass's own
masks come from a generator seeded with `seed` in that same order (checked separately: reproducible, right
density)."""
import pytest
import torch

from rewriter import UserError, rewrite
from rewriter.lora_combine import combine, trim
from rewriter.lora_runtime import adapter_table
from tests.lora_peft_helpers import Net, peft_model, save_each, set_active

peft = pytest.importorskip("peft")

METHODS = ["linear", "cat", "svd", "ties", "dare_linear", "dare_ties", "magnitude_prune"]
SOURCES = {"u": dict(r=4, lora_alpha=8, target_modules=["fc1", "fc2", "out"]),
           "v": dict(r=4, lora_alpha=6, target_modules=["fc1", "out"]),
           "w": dict(r=4, lora_alpha=3, target_modules=["fc2", "out"])}


def _relative(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("weights, seed", [((0.7, 0.3, 1.0), 0), ((1.5, -0.4, 0.25), 1)])
def test_combination_matches_peft_to_1e6(method, weights, seed):
    torch.manual_seed(seed)
    model = peft_model(Net(), SOURCES, seed=seed)
    recorded, bernoulli = [], torch.bernoulli

    def spy(*args, **kwargs):
        out = bernoulli(*args, **kwargs)
        recorded.append(out.clone())
        return out
    torch.bernoulli = spy
    try:
        model.add_weighted_adapter(list(SOURCES), list(weights), "mix", combination_type=method, density=0.5)
    finally:
        torch.bernoulli = bernoulli
    masks = iter(recorded)
    for layer_name in ("fc1", "fc2", "out"):
        layer = getattr(model.base_model.model, layer_name)
        present = [n for n in SOURCES if n in layer.lora_A]
        sources = [(layer.lora_A[n].weight.detach(), layer.lora_B[n].weight.detach(), layer.scaling[n]) for n in present]
        a, b = combine(method, sources, [weights[list(SOURCES).index(n)] for n in present], density=0.5,
                       draw=lambda t: next(masks))
        pa, pb = layer.lora_A["mix"].weight.detach(), layer.lora_B["mix"].weight.detach()
        assert layer.scaling["mix"] == 1.0
        if method == "cat":   # PEFT allocates Σ of the configs' ranks and zero-pads layers that lack an adapter
            assert not pa[a.shape[0]:].any() and not pb[:, b.shape[1]:].any()
            pa, pb = pa[:a.shape[0]], pb[:, :b.shape[1]]
        assert _relative(b.double() @ a.double(), pb.double() @ pa.double()) <= 1e-6, layer_name
        if method != "svd":                     # SVD factors are unique only up to signs; their product is compared
            assert _relative(a, pa) <= 1e-6 and _relative(b, pb) <= 1e-6, layer_name
    assert next(masks, None) is None           # every recorded mask was used, in PEFT's order


@pytest.mark.parametrize("method", ["cat", "svd", "ties", "magnitude_prune", "linear"])
def test_pass_output_equals_peft_with_the_mix_active(tmp_path, method):
    torch.manual_seed(0)
    base = Net().eval()
    model = peft_model(base, SOURCES)
    folders = save_each(model, tmp_path)
    x = torch.randn(4, 12)
    loads = ",".join(f"lora{{adapter='{folders[n]}',name={n}}}" for n in SOURCES)
    ours = rewrite(base, (x,), f"{loads},lora-combine{{adapters='u:0.7,v:0.3,w:-0.5',method={method},density=0.5}}")
    model.add_weighted_adapter(list(SOURCES), [0.7, 0.3, -0.5], "mix", combination_type=method, density=0.5)
    set_active(model, ["mix"])
    with torch.no_grad():
        torch.testing.assert_close(ours.module()(x), model(x), rtol=1e-5, atol=1e-5)
    table = adapter_table(ours.program)
    assert table["mix"]["gate"] == 1.0 and all(table[n]["gate"] == 0.0 for n in SOURCES)


def test_dare_masks_are_seeded_and_have_the_density():
    gen = torch.Generator().manual_seed(3)
    sources = [(torch.randn(8, 300, generator=gen), torch.randn(20, 8, generator=gen), 1.0) for _ in range(2)]
    first = combine("dare_linear", sources, [1.0, 1.0], density=0.3, generator=torch.Generator().manual_seed(5))
    again = combine("dare_linear", sources, [1.0, 1.0], density=0.3, generator=torch.Generator().manual_seed(5))
    other = combine("dare_linear", sources, [1.0, 1.0], density=0.3, generator=torch.Generator().manual_seed(6))
    assert all(torch.equal(p, q) for p, q in zip(first, again)) and not torch.equal(first[0], other[0])
    one = combine("dare_linear", sources[:1] * 2, [1.0, 0.0], density=0.3, generator=torch.Generator().manual_seed(5))
    kept = float((one[0] != 0).float().mean())
    assert 0.25 < kept < 0.35           # ~density of the entries survive, rescaled by 1/density


def test_trim_keeps_the_largest_entries():
    t = torch.tensor([[0.1, -3.0, 2.0], [0.5, -0.2, 1.0]])
    assert torch.equal(trim(t, 0.5), torch.tensor([[0.0, -3.0, 2.0], [0.0, 0.0, 1.0]]))
    assert torch.equal(trim(t, 1.0), t)


def test_refusals_are_one_line(tiny_gpt):
    model, args = tiny_gpt
    program = rewrite(model, args, "lora{name=a,rank=2,targets=mlp},lora{name=b,rank=3,targets=mlp}").program
    with pytest.raises(UserError, match="needs adapters of one rank"):
        rewrite(program, None, "lora-combine{adapters='a:1,b:1',method=ties}")
    with pytest.raises(UserError, match="no adapter named 'zz'"):
        rewrite(program, None, "lora-combine{adapters='a:1,zz:1'}")
    with pytest.raises(UserError, match="needs adapters="):
        rewrite(program, None, "lora-combine")
    dora = rewrite(model, args, "lora{name=d,dora=true,rank=2,targets=mlp}").program
    with pytest.raises(UserError, match="is DoRA"):
        rewrite(dora, None, "lora-combine{adapters=d:1}")
    exact = rewrite(program, None, "lora-combine{adapters='a:1,b:0.5',activate=false}", verify=True)
    assert exact.report.passes[0].contract == "exact" and adapter_table(exact.program)["mix"]["gate"] == 0.0
