"""Test set-up: Triton runs in interpreter mode on the CPU (must be set before triton is imported), unless
REWRITE_TEST_DEVICE names a GPU (`make test-gpu`: kernels compiled on CUDA); hypothesis runs a bounded number of
examples with no deadline (first calls compile/trace)."""
import os

if os.environ.get("REWRITE_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile("default", max_examples=20, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=20, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# the long run of the numerics properties (tests without their own max_examples):
#   pytest --hypothesis-profile=long -k "ulp or tolerance"   (bench/numerics.py runs it under every ATen capability)
settings.register_profile("long", max_examples=3000, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("ci" if os.environ.get("CI") else "default")

torch.set_num_threads(1)


@pytest.fixture
def tiny_gpt():
    from rewriter.demo_models import demo_model
    return demo_model("tiny-gpt")
