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
# The long run of the property tests: REWRITE_EXAMPLES_SCALE=K multiplies every @given test's max_examples by K
# (its own @settings included; see pytest_collection_modifyitems), with no example database, e.g.
#   REWRITE_EXAMPLES_SCALE=50 ATEN_CPU_CAPABILITY=avx2 pytest tests/test_attention.py
# (`python -m bench.numerics` runs the numerics tests that way under every ATen CPU capability.)
settings.load_profile("ci" if os.environ.get("CI") else "default")
EXAMPLES_SCALE = float(os.environ.get("REWRITE_EXAMPLES_SCALE", "1"))


def pytest_collection_modifyitems(config, items):
    if EXAMPLES_SCALE == 1:
        return
    for item in items:
        test = getattr(item, "obj", None)
        current = getattr(test, "_hypothesis_internal_use_settings", None)
        if current is None or not hasattr(test, "hypothesis"):
            continue
        test._hypothesis_internal_use_settings = settings(
            current, max_examples=max(1, int(current.max_examples * EXAMPLES_SCALE)), database=None,
            derandomize=False)

torch.set_num_threads(1)


@pytest.fixture
def tiny_gpt():
    from rewriter.demo_models import demo_model
    return demo_model("tiny-gpt")
