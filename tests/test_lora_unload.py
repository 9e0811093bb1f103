"""lora-merge{unload=true}: the base model's parameters and bytes exactly; adapters on compressed layers (item 7)."""
import pytest
import torch

from rewriter import cost, rewrite
from rewriter.cli import main
from tests.helpers import LinearStack, randomize_adapters


def _bytes(program) -> int:
    return cost.program_params(program.module())["bytes"]


def test_unload_gives_the_base_models_parameters_and_bytes(tiny_gpt):
    model, args = tiny_gpt
    base = rewrite(model, args, "").program
    inserted = rewrite(model, args, "lora{rank=8,init=gaussian},lora{name=second,rank=4,init=gaussian}")
    randomize_adapters(inserted.program)
    with torch.no_grad():
        expected = inserted.module()(*args)
    kept = rewrite(inserted.program, args, "lora-merge", verify=True)
    unloaded = rewrite(inserted.program, args, "lora-merge{unload=true}", verify=True)
    assert {k: (v.shape, v.dtype) for k, v in unloaded.program.state_dict.items()} == \
        {k: (v.shape, v.dtype) for k, v in base.state_dict.items()}
    assert _bytes(unloaded.program) == _bytes(base)
    assert _bytes(kept.program) > _bytes(base)
    with torch.no_grad():
        torch.testing.assert_close(unloaded.module()(*args), expected, rtol=1e-5, atol=1e-5)
    message = " ".join(unloaded.report.passes[0].messages)
    assert "unloaded" in message and f"{_bytes(base):,} bytes" in message
    assert "bit-exactly undoable" in " ".join(kept.report.passes[0].messages)
    assert all(s["form"] == "unloaded" for s in unloaded.report.passes[0].sites)
    # a program merged earlier can still be unloaded: the kept tensors go
    later = rewrite(kept.program, args, "lora-merge{unload=true}", verify=True)
    assert set(later.program.state_dict) == set(base.state_dict)
    for name, value in unloaded.program.state_dict.items():
        assert torch.equal(later.program.state_dict[name], value), name


def test_unload_drops_inactive_adapters_and_the_row_index():
    torch.manual_seed(0)
    model, x = LinearStack([8, 12, 6], [True, True]), torch.randn(3, 8)
    result = rewrite(model, (x,), "lora{name=a,rank=2,init=gaussian},lora{name=b,rank=2,init=gaussian},"
                                  "lora-batch,lora-select{adapters=a},lora-merge{unload=true}", verify=True)
    assert set(result.program.state_dict) == set(model.state_dict())


def test_gpt2_layout_unload_keeps_addmm_and_bytes():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    torch.manual_seed(0)

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = transformers.GPT2LMHeadModel(config).eval()

        def forward(self, ids):
            return self.m(ids, use_cache=False).logits

    model, args = Logits(), (torch.randint(0, 64, (2, 6)),)
    base = rewrite(model, args, "").program
    result = rewrite(model, args, "lora{rank=4,init=gaussian},lora-merge{unload=true}", verify=True)
    ops = [str(n.target) for n in result.program.graph.nodes if n.op == "call_function"]
    assert ops.count("aten.addmm.default") == 4 and _bytes(result.program) == _bytes(base)


@pytest.mark.parametrize("compress", ["shiftadd{group=8}", "monarch{blocks=2}", "blockdiag{blocks=2}",
                                      "lowrank{rank=4}"])
def test_adapters_on_compressed_layers(compress, tmp_path):
    torch.manual_seed(0)
    model, x = LinearStack([16, 24, 16], [True, False]), torch.randn(5, 16)
    compressed = rewrite(model, (x,), compress)
    result = rewrite(compressed.program, (x,), "lora{rank=3,init=gaussian}", verify=True)
    sites = result.report.passes[0].sites
    assert [s["form"] for s in sites] == ["switchable", "switchable"], sites
    randomize_adapters(result.program, scale=0.5)
    module = result.module()
    with torch.no_grad():
        base = compressed.module()(x)
        adapted = module(x)
    assert not torch.allclose(base, adapted)
    # the adapter is the only thing added: with B = 0 again the compressed program comes back
    with torch.no_grad():
        for name, t in result.program.state_dict.items():
            if name.endswith("lora_B"):
                t.zero_()
        torch.testing.assert_close(result.module()(x), base)
    # QLoRA-style fine-tuning: only the adapters train, through the compressed layer
    randomize_adapters(result.program)
    module = result.module()
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert len(trainable) == 4
    module(x).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    merged = rewrite(result.program, (x,), "lora-merge")
    assert all("compressed form" in s["reason"] for s in merged.report.passes[0].sites)
    path = tmp_path / "q.pt2"
    result.save(str(path))
    assert main([str(path), "--pass", "lora{name=more,rank=2}", "-q", "--verify"]) == 0


@pytest.mark.parametrize("spec", ["lora{name=n,rank=2}", "lora{rank=2},lora{name=n,rank=2},lora-merge,lora-unmerge",
                                  "lora{dora=true}", "lowrank{rank=3},lora{rank=2}",
                                  "lora{rank=2,dropout=0.1},lora{name=q,rank=2},lora-merge{unload=true}"])
def test_linears_in_a_row(spec):
    """Each layer reads the previous one's new op: rewriting one must leave the next one's input readable."""
    class Chain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = torch.nn.Linear(8, 12), torch.nn.Linear(12, 6, bias=False), torch.nn.Linear(6, 4)

        def forward(self, x):
            return self.c(self.b(self.a(x)))
    torch.manual_seed(0)
    result = rewrite(Chain(), (torch.randn(3, 8),), spec, verify=True)
    assert all(not p.skipped for p in result.report.passes)
