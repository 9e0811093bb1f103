"""Every registered pass on random models through the CLI: `rewrite model.pt2 --pass P --verify -o out.pt2`
must exit 0 (written, loads, runs), 1 or 2 with a one-line reason — never 3, never a traceback, never touching the
input file."""
import pytest
from hypothesis import HealthCheck, given, settings

from tests.fuzzing import pass_specs, run_cli
from tests.random_models import model_specs
from tests.test_fuzz_api import REGRESSIONS


@pytest.mark.parametrize("pipeline", pass_specs())
def test_every_pass_through_the_cli(pipeline, tmp_path):
    @settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
    @given(model_specs())
    def check(spec):
        verdict = run_cli(spec, pipeline, str(tmp_path))
        assert verdict.ok, verdict.detail
    check()


@pytest.mark.parametrize("pipeline", ["lora{rank=4}", "lora{init=pissa},lora-merge", "shiftadd",
                                      "lowrank{rank=8}", "monarch{blocks=4}", "blockdiag{blocks=4}"])
@pytest.mark.parametrize("case", ["two-linears", "single-linear", "fan-out-returned"])
def test_issue_11_graphs_through_the_cli(case, pipeline, tmp_path):
    verdict = run_cli(REGRESSIONS[case], pipeline, str(tmp_path))
    assert verdict.outcome == "rewritten", verdict.detail
