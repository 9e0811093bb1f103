"""Output sensitivities (rewriter/sensitivity.py): the diagonal Fisher information of each linear layer's outputs."""
from __future__ import annotations

import torch

from rewriter import calibration, rewrite, sensitivity
from rewriter.matchers.linear import find_linears, is_lm_head
from tests.helpers import StubContext


def test_mse_model_sensitivity_is_the_column_norms_of_what_follows():
    """y = W2·(W1·x), measured by its normalised squared error: the second layer's outputs are the model's (J = I,
    f = E[ε²]/ms(y) = 1/ms(y)), the first layer's reach the output through W2 (f_i = Σ_j W2[j, i]² / ms(y), the
    diagonal of W2ᵀW2). A third layer beside them that no output depends on gets f = 0."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = torch.nn.Linear(6, 5, bias=False), torch.nn.Linear(5, 4, bias=False)
            self.unused = torch.nn.Linear(6, 3)

        def forward(self, x):
            self.unused(x)
            return self.second(self.first(x))

    torch.manual_seed(0)
    model = Net()
    ctx = StubContext(model, (torch.randn(50, 6),))
    sites = {s.name: s for s in find_linears(ctx.gm)}
    spec = calibration.DataSpec("self", 4000, 8, 0)
    f = sensitivity.output_fisher(ctx, spec, list(sites.values()))
    with torch.no_grad():
        inv_ms = torch.tensor([1 / float(model(b[0]).double().square().mean()) for b in calibration.batches(ctx, spec)])
    w2 = model.second.weight.detach().double()
    assert torch.allclose(f["second"], inv_ms.mean() * torch.ones(4, dtype=torch.float64), rtol=0.1)
    assert torch.allclose(f["first"], inv_ms.mean() * (w2 * w2).sum(0), rtol=0.15)
    assert torch.equal(f["unused"], torch.zeros(3, dtype=torch.float64))


def test_lm_head_sensitivity_is_the_softmax_variance(tiny_gpt):
    """At the logits the sampled-label gradient is onehot(ŷ) − p, so Σ_i f_i = E[1 − ‖p‖²] with ŷ drawn from the
    model (the Fisher of its own distribution); labels fixed at the argmax would give E[1 − 2·p_max + ‖p‖²]. The
    demo model's head (tied to the embedding) is scaled down so that its distributions are not one-hot."""
    model, args = tiny_gpt
    with torch.no_grad():
        model.lm_head.weight.mul_(0.1)
    ctx = StubContext(model, args)
    spec = calibration.DataSpec("self", 256, 16, 0)
    sites = find_linears(ctx.gm)
    f = sensitivity.output_fisher(ctx, spec, sites)
    assert f.keys() == {s.name for s in sites}
    assert all(f[s.name].shape == (s.out_features,) and bool(torch.isfinite(f[s.name]).all())
               and float(f[s.name].min()) >= 0 for s in sites)
    fisher = argmax = rows = 0.0
    with torch.no_grad():
        for flat in calibration.batches(ctx, spec):
            p = torch.softmax(calibration.run_flat(ctx.gm, flat).double(), -1).reshape(-1, 256)
            fisher += float((1 - (p * p).sum(-1)).sum())
            argmax += float((1 - 2 * p.max(-1).values + (p * p).sum(-1)).sum())
            rows += p.shape[0]
    head = next(s for s in sites if is_lm_head(ctx.gm, s))
    assert abs(float(f[head.name].sum()) - fisher / rows) < 0.1 * abs(fisher - argmax) / rows
    assert sensitivity.output_fisher(ctx, spec, sites) is f                       # measured once per pipeline
    other = StubContext(model, args)
    again = sensitivity.output_fisher(other, spec, find_linears(other.gm))
    assert all(torch.equal(f[k], again[k]) for k in f)                            # seeded: the same every run


def test_structured_reports_estimated_kl(tiny_gpt):
    model, args = tiny_gpt
    res = rewrite(model, args, passes="structured{budget=0.5,calibrate=4}").report.passes[0]
    assert "est. KL" in res.messages[-1]
    rewritten = [s for s in res.sites if s["status"] == "rewritten"]
    assert rewritten and all(s["estimated_loss"] >= 0 for s in rewritten)
