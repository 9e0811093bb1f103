"""Device and dtype invariants on the demo models: every registered pass builds its tensors on the device of the
tensors it replaces (checked on the CPU by running each pass with torch's default device set to "meta", and on CUDA
under `make test-gpu` with REWRITE_TEST_DEVICE=cuda), and keeps the model's dtype."""
import pytest
import torch

import rewriter
from rewriter.demo_models import demo_model
from rewriter.errors import UserError
from tests.fuzzing import check_result, pass_specs, tag_pass_devices
from tests.random_models import fuzz_device

CASES = [("tiny-gpt", torch.bfloat16), ("tiny-vit", torch.float16)]   # tiny-bert (SDPA) forms: random models


@pytest.mark.parametrize("pipeline", pass_specs())
@pytest.mark.parametrize("name,dtype", CASES)
def test_every_pass_keeps_device_and_dtype_on_demo_models(name, dtype, pipeline):
    model, args = demo_model(name)
    device = fuzz_device()
    model = model.to(device=device, dtype=dtype)
    args = tuple(a.to(device=device, dtype=dtype) if a.is_floating_point() else a.to(device) for a in args)
    try:
        with tag_pass_devices():
            result = rewriter.rewrite(model, args, pipeline, verify=True)
    except UserError as e:            # declining is allowed; it must say why in one line
        assert str(e).strip() and len(str(e).strip().splitlines()) == 1
        return
    problem = check_result(dtype, model, args, result.program)
    assert problem is None, problem
