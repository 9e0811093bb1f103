"""Every registered pass on random models with its ops lowered to Triton kernels (codegen="triton"; the interpreter
on the CPU, compiled kernels under `make test-gpu`): the lowered program must verify, or the run must decline."""
import pytest
from hypothesis import HealthCheck, given, settings

from tests.fuzzing import pass_specs, run_codegen
from tests.random_models import model_specs


@pytest.mark.parametrize("pipeline", pass_specs())
def test_every_pass_lowered_to_triton(pipeline):
    @settings(max_examples=2, deadline=None, suppress_health_check=list(HealthCheck))
    @given(model_specs(max_steps=4))
    def check(spec):
        verdict = run_codegen(spec, pipeline)
        assert verdict.ok, verdict.detail
    check()
