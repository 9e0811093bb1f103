"""The LoRA passes that need adapters to act (so the per-pass device test skips them) build their tensors on the
weights' device and keep the model's dtype: run with torch's default device "meta" on bf16 / fp16 demo models."""
import pytest
import torch

import rewriter
from rewriter.demo_models import demo_model
from tests.fuzzing import check_result, tag_pass_devices
from tests.random_models import fuzz_device

PIPELINES = [
    "lora{name=a,rank=2},lora{name=b,rank=3,dora=true},lora-batch,lora-select{adapters=a+b:0.5},lora-merge,lora-unmerge",
    "lora{name=a,rank=2,init=gaussian},lora{name=b,rank=2,init=gaussian},"
    "lora-combine{adapters='a:0.7,b:0.3',method=dare_ties},lora-merge{unload=true}",
    "lora{rank=2},lora{name=c,rank=2},lora-combine{adapters=default+c,method=svd},lora-merge,lora-merge{unload=true}",
    "shiftadd{group=8},lora{rank=2}",
]


@pytest.mark.parametrize("pipeline", PIPELINES)
@pytest.mark.parametrize("name,dtype", [("tiny-gpt", torch.bfloat16), ("tiny-vit", torch.float16)])
def test_lora_pipelines_keep_device_and_dtype(name, dtype, pipeline):
    model, args = demo_model(name)
    device = fuzz_device()
    model = model.to(device=device, dtype=dtype)
    args = tuple(a.to(device=device, dtype=dtype) if a.is_floating_point() else a.to(device) for a in args)
    with tag_pass_devices():
        result = rewriter.rewrite(model, args, pipeline, verify=True)
    assert all(p.skipped is None for p in result.report.passes), [p.skipped for p in result.report.passes]
    problem = check_result(dtype, model, args, result.program)
    assert problem is None, problem
