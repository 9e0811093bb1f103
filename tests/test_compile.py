"""The same passes inside torch.compile: rewriter.backend(...) and the registered "rewrite" backend."""
import pytest
import torch

import rewriter
from rewriter.compile_backend import _qualname
from tests.helpers import LinearStack


def test_source_names_become_qualified_names():
    assert _qualname("L['self']._modules['blocks']._modules['0']._modules['fc']._parameters['weight']") \
        == "blocks.0.fc.weight"
    assert _qualname("L['x']") is None


def _model_with_adapters():
    torch.manual_seed(0)
    model = LinearStack([8, 16, 8], [True, True])
    x = torch.randn(4, 8)
    result = rewriter.rewrite(model, (x,), "lora{rank=2,init=gaussian}")
    module = result.module()
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("lora_B"):
                p.normal_()
    return module, x


def test_backend_merges_adapters_and_keeps_outputs():
    module, x = _model_with_adapters()
    with torch.no_grad():
        expected = module(x)
    backend = rewriter.backend("lora-merge", inner="eager", verify=True)
    compiled = torch.compile(module, backend=backend, dynamic=False)
    with torch.no_grad():
        got = compiled(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    (merge,) = backend.report.passes
    assert merge.name == "lora-merge" and len(merge.sites) == 2 and merge.error_vs_previous <= 1e-5


def test_backend_with_inductor_and_registered_name():
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = LinearStack([8, 8], [True]).eval()
    x = torch.randn(2, 8)
    compiled = torch.compile(model, backend="rewrite", options={"passes": "lora{rank=2}"}, dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_backend_rejects_bad_pipeline_before_compiling():
    with pytest.raises(rewriter.UserError, match="unknown pass"):
        rewriter.backend("lora-mege")
