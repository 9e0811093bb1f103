"""Pipeline spec strings: parse/print round-trips and one-line errors with suggestions."""
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rewriter import UserError, parse_pipeline, print_pipeline
from rewriter.pass_base import registry


def test_registry_finds_lora_passes():
    names = set(registry())
    assert {"lora", "lora-merge", "lora-unmerge"} <= names


def test_parse_options_and_defaults():
    (p,) = parse_pipeline("lora{rank=4,alpha=8,targets='attn\\.(q|v)',rslora=true}")
    assert (p.rank, p.alpha, p.targets, p.rslora) == (4, 8.0, "attn\\.(q|v)", True)
    assert p.scale == pytest.approx(8 / 2)  # rsLoRA: alpha / sqrt(rank)
    assert parse_pipeline("lora")[0].rank == 8


regex_text = st.text(alphabet="abq.*|(){},=\\ _0123456789", max_size=12).filter(
    lambda s: not ('"' in s and "'" in s))


@given(rank=st.integers(1, 64), alpha=st.floats(0.0, 64.0, allow_nan=False), targets=regex_text,
       rslora=st.booleans(), init=st.sampled_from(["zeros", "gaussian", "pissa"]), merge=st.booleans())
def test_print_parse_round_trip(rank, alpha, targets, rslora, init, merge):
    from passes.lora import LoraPass
    from passes.lora_merge import LoraMergePass
    pipeline = [LoraPass(rank=rank, alpha=alpha, targets=targets, rslora=rslora, init=init)]
    if merge:
        pipeline.append(LoraMergePass())
    text = print_pipeline(pipeline)
    assert parse_pipeline(text) == pipeline
    assert print_pipeline(parse_pipeline(text)) == text


@pytest.mark.parametrize("spec, fragment", [
    ("lorra", 'did you mean "lora"'),
    ("lora{rnak=4}", 'did you mean "rank"'),
    ("lora{rank=four}", "expected an integer"),
    ("lora{init=pisa}", 'did you mean "pissa"'),
    ("lora{rank=0}", "rank must be >= 1"),
    ("lora{rank}", "needs a value"),
    ("lora{rank=4", "unbalanced"),
    ("lora{rank=4}x", "must end with"),
    ("", "empty pipeline"),
    ("lora{rank=1,rank=2}", "given twice"),
])
def test_bad_specs_give_one_line_errors(spec, fragment):
    with pytest.raises(UserError) as info:
        parse_pipeline(spec)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message
