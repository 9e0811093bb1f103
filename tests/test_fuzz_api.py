"""Every registered pass on random models through the Python API, with verify=True (tests/fuzzing.py says what
counts as a pass and what as a bug). Passes are discovered from the registry: a new pass is fuzzed without anyone
adding it here. The long run: `python -m bench.fuzz --examples 500`."""
import pytest
from hypothesis import HealthCheck, given, settings

from tests.fuzzing import PIPELINES, pass_specs, run_api
from tests.random_models import ModelSpec, model_specs

FUZZ = settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))

# graphs that broke the core before the fuzzer existed (issue 11): two linears in a row, a model that is one
# nn.Linear (weight at the root), a linear feeding two others and returned as an output
REGRESSIONS = {
    "two-linears": ModelSpec("net", "features", 16, (("linear", 0, 16, True), ("linear", 1, 16, True)), seed=1),
    "two-linears-no-bias": ModelSpec("net", "features", 16, (("linear", 0, 16, False), ("linear", 1, 16, False)),
                                     dtype="bfloat16", seed=2),
    "single-linear": ModelSpec("single-linear", "features", 32, (), seed=3, out_width=32),
    "fan-out-returned": ModelSpec("net", "features", 16, (("linear", 0, 16, True), ("linear", 1, 8, True),
                                                          ("linear", 1, 8, True), ("add", 2, 3)),
                                  extra_outputs=(1,), seed=4),
}


@pytest.mark.parametrize("pipeline", pass_specs() + PIPELINES)
@pytest.mark.parametrize("case", list(REGRESSIONS))
def test_known_hard_graphs(pipeline, case):
    verdict = run_api(REGRESSIONS[case], pipeline)
    assert verdict.ok, verdict.detail


@pytest.mark.parametrize("pipeline", pass_specs())
def test_every_pass_on_random_models(pipeline):
    @FUZZ
    @given(model_specs())
    def check(spec):
        verdict = run_api(spec, pipeline)
        assert verdict.ok, verdict.detail
    check()


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_pipelines_on_random_models(pipeline):
    @settings(FUZZ, max_examples=4)
    @given(model_specs())
    def check(spec):
        verdict = run_api(spec, pipeline)
        assert verdict.ok, verdict.detail
    check()
