"""Inside torch.compile the same passes give the same program: for random models and every registered pass,
torch.compile(m, backend=rewriter.backend(P)) computes what rewriter.rewrite(m, args, P).module() computes and
rewrites as many sites, or both decline."""
import pytest
from hypothesis import HealthCheck, given, settings

from tests.fuzzing import pass_specs, run_compile
from tests.random_models import model_specs


@pytest.mark.parametrize("pipeline", pass_specs() + ["lora{init=pissa},lora-merge"])
def test_compile_agrees_with_rewrite(pipeline):
    @settings(max_examples=2, deadline=None, suppress_health_check=list(HealthCheck))
    @given(model_specs())
    def check(spec):
        verdict = run_compile(spec, pipeline)
        assert verdict.ok, verdict.detail
    check()
