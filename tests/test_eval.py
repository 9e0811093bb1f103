"""`rewrite eval`: metrics on tiny HF models built in code, a demo model, metric helpers, and errors."""
from __future__ import annotations

import argparse
import io
import json
import math

import pytest
import torch
from rich.console import Console

pytest.importorskip("transformers")

from rewriter import UserError  # noqa: E402
from rewriter import evaluate as ev  # noqa: E402
from test_hf import TEXT, make_bert, make_llama  # noqa: E402

PAIRS = [
    {"a": "the water of the house", "b": "the water in the house", "score": 4.5},
    {"a": "a man will go home", "b": "the animal found a letter", "score": 0.5},
    {"a": "people live in a small house", "b": "people live in a large home", "score": 3.5},
    {"a": "the boy came back", "b": "the mother said no", "score": 1.0},
]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("llama_eval"))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return make_bert(tmp_path_factory.mktemp("bert_eval"))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    (folder / "text.txt").write_text(TEXT)
    (folder / "pairs.json").write_text(json.dumps(PAIRS))
    return str(folder / "text.txt"), str(folder / "pairs.json")


def run_eval(*argv, fmt="json"):
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    ev.add_arguments(parser)
    args = parser.parse_args([*argv, "--format", fmt, "--repeat", "1"])
    out = io.StringIO()
    code = ev.run(args, Console(file=out, width=200))
    assert code == 0
    return json.loads(out.getvalue()) if fmt == "json" else out.getvalue()


# ---------------------------------------------------------------------------------------------- end to end
def test_causal_lm_perplexity_exact_pipeline(llama_dir, files):
    text, _ = files
    r = run_eval(llama_dir, "--pass", "lora{rank=4},lora-merge", "--text", text, "--window", "16",
                 "--max-tokens", "40", "--verify")
    m = r["metrics"]
    assert r["metric"] == "ppl" and m["windows"] == [2, 16] and m["tokens"] == 32
    assert r["input_shapes"] == [[2, 16]]                 # exported with exactly the evaluated batch
    assert math.isfinite(m["ppl_original"]) and m["ppl_original"] > 1
    assert m["ppl_rewritten"] == pytest.approx(m["ppl_original"], rel=1e-5)
    assert m["top1_agreement"] == 1.0 and m["top5_agreement"] == 1.0 and abs(m["kl"]) < 1e-8
    assert m["output_error"] <= 1e-5
    names = [p["pass"] for p in r["pass_results"]]
    assert names == ["lora{rank=4}", "lora-merge"]
    assert r["pass_results"][0]["sites_rewritten"] > 0
    assert r["params"]["original"] > 0 and r["bytes"]["original"] >= 4 * r["params"]["original"]
    assert r["forward_s"]["ratio"] > 0
    assert r["command"].startswith("rewrite eval ") and "--pass 'lora{rank=4},lora-merge'" in r["command"]


def test_also_text_measures_the_same_programs_on_another_text(llama_dir, files, tmp_path):
    """--also-text: the figures of another text through the same programs — equal to evaluating that text as
    --text; windows as long as the evaluation text's, as many as the static programs take; fewer is refused."""
    text, _ = files
    other = tmp_path / "other.txt"
    other.write_text(" ".join(reversed(TEXT.split())) * 3)
    r = run_eval(llama_dir, "--pass", "lowrank{ratio=0.5,calibrate=2,seq=8}", "--text", text, "--also-text",
                 str(other), "--window", "16", "--max-tokens", "40")
    alone = run_eval(llama_dir, "--pass", "lowrank{ratio=0.5,calibrate=2,seq=8}", "--text", str(other), "--window",
                     "16", "--max-tokens", "40")
    also = r["metrics"]["also"][str(other)]
    assert also["windows"] == [2, 16] and r["metrics"]["windows"] == [2, 16]
    for key in ("ppl_original", "ppl_rewritten", "kl", "top1_agreement"):
        assert also[key] == pytest.approx(alone["metrics"][key], rel=1e-5, abs=1e-7), key
    assert also["ppl_original"] != pytest.approx(r["metrics"]["ppl_original"], rel=1e-3)
    assert f"--also-text {other}" in r["command"]
    assert "perplexity, other.txt" in run_eval(llama_dir, "--text", text, "--also-text", str(other), "--window",
                                               "16", "--max-tokens", "40", fmt="table")
    short = tmp_path / "short.txt"
    short.write_text(" ".join(TEXT.split()[:12]))
    with pytest.raises(UserError, match="--also-text .* windows") as e:
        run_eval(llama_dir, "--text", text, "--also-text", str(short), "--window", "16", "--max-tokens", "40")
    assert "\n" not in str(e.value)


def test_perplexity_matches_direct_computation(llama_dir, files):
    """ppl from the eval equals exp(mean NLL) computed by hand with the HF model on the same windows."""
    import transformers
    text, _ = files
    r = run_eval(llama_dir, "--text", text, "--window", "16", "--max-tokens", "40", "--attn", "sdpa")
    tok = transformers.AutoTokenizer.from_pretrained(llama_dir)
    ids = torch.tensor(tok(TEXT, add_special_tokens=False)["input_ids"][:32]).view(2, 16)
    model = transformers.LlamaForCausalLM.from_pretrained(llama_dir).eval()
    with torch.no_grad():
        loss = model(ids, labels=ids, use_cache=False).loss
    assert r["metrics"]["ppl_original"] == pytest.approx(math.exp(float(loss)), rel=1e-4)
    assert r["pass_results"] == [] and r["metrics"]["output_error"] == 0.0


def test_encoder_cosine(bert_dir, files):
    _, pairs = files
    r = run_eval(bert_dir, "--pass", "lora{rank=2},lora-merge", "--pairs", pairs)
    m = r["metrics"]
    assert r["metric"] == "cosine" and m["sentences"] == 2 * len(PAIRS)
    assert m["cosine_min"] > 1 - 1e-5 and m["spearman_pairs"] == pytest.approx(1.0)
    assert m["spearman_human_original"] == pytest.approx(m["spearman_human_rewritten"])


def test_table_output(bert_dir, files):
    _, pairs = files
    text = run_eval(bert_dir, "--pass", "lora", "--pairs", pairs, fmt="table")
    for needle in ("cosine(original, rewritten)", "Spearman", "parameters", "forward time", "lora",
                   "rewrite eval " + bert_dir):
        assert needle in text


def test_demo_model_agree():
    r = run_eval("demo:tiny-gpt", "--pass", "lora{rank=2},lora-merge")
    assert r["metric"] == "agree"
    assert r["metrics"]["top1_agreement"] == 1.0 and r["metrics"]["output_error"] <= 1e-5


# ---------------------------------------------------------------------------------------------- metrics
def test_next_token_metrics_see_changes():
    torch.manual_seed(0)
    logits = torch.randn(2, 8, 50)
    same = ev.next_token_metrics(logits, logits.clone(), None)
    assert same["top1_agreement"] == 1.0 and same["kl"] == pytest.approx(0.0, abs=1e-12)
    flipped = ev.next_token_metrics(logits, -logits, None)  # argmax becomes argmin everywhere
    assert flipped["top1_agreement"] == 0.0 and flipped["top5_agreement"] == 0.0 and flipped["kl"] > 1
    noisy = ev.next_token_metrics(logits, logits + 0.3 * torch.randn_like(logits), None)
    assert 0 < noisy["kl"] < flipped["kl"]


def test_perplexity_of_uniform_logits_is_vocab_size():
    ids = torch.randint(0, 37, (3, 9))
    m = ev.next_token_metrics(torch.zeros(3, 9, 37), torch.zeros(3, 9, 37), ids)
    assert m["ppl_original"] == pytest.approx(37.0) and m["ppl_rewritten"] == pytest.approx(37.0)


def test_spearman():
    assert ev.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert ev.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert ev.spearman([1, 2, 3, 4], [1, 4, 9, 16]) == pytest.approx(1.0)     # monotone, not linear
    # ties get average ranks: x ranks (0, 1.5, 1.5, 3) vs y ranks (0, 1, 2, 3)
    assert ev.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833, rel=1e-6)


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 1.0], [3.0, 3.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.equal(ev.mean_pool(hidden, mask), torch.tensor([[2.0, 2.0]]))


def test_program_bytes_counts_tied_weights_once():
    from rewriter.demo_models import demo_model
    model, args = demo_model("tiny-gpt")
    program = torch.export.export(model, args)
    distinct = {id(p): p for p in model.parameters()}.values()
    params = sum(p.numel() for p in distinct)
    assert ev.program_params(program) == params
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert ev.program_bytes(program) == 4 * params + buffers


# ---------------------------------------------------------------------------------------------- errors
def test_eval_on_a_device_matches_the_default(llama_dir, bert_dir, files):
    """--device loads the model there and runs pipeline, heal and metrics on it (cpu here; cuda on a GPU)."""
    text, pairs = files
    device = "cuda" if torch.cuda.is_available() else "cpu"
    common = ("--pass", "lowrank{ratio=0.5,calibrate=4},heal{steps=2,samples=4,seq=8,batch=2}", "--text", text,
              "--window", "16", "--max-tokens", "32")
    a, b = run_eval(llama_dir, *common), run_eval(llama_dir, *common, "--device", device)
    assert b["command"].endswith(f"--device {device}")
    assert b["metrics"]["ppl_rewritten"] == pytest.approx(a["metrics"]["ppl_rewritten"], rel=1e-3)
    c = run_eval(bert_dir, "--pass", "lowrank{ratio=0.5}", "--pairs", pairs, "--device", device)
    assert 0.5 < c["metrics"]["cosine_mean"] <= 1.0 + 1e-9


def test_accuracy_bench_refuses_an_unwritable_out_before_measuring(tmp_path, capsys):
    from bench import accuracy
    with pytest.raises(SystemExit) as e:
        accuracy.main(["--model", "minilm", "--out", str(tmp_path / "missing" / "rows.jsonl")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "--out" in err[-1] and "No such file" in err[-1] and "Traceback" not in "".join(err)


def test_accuracy_bench_passes_also_text_to_eval():
    from bench.accuracy import eval_args
    args = eval_args("smollm2", "lowrank", tokens=64, window=32, repeat=1, attn="eager", also_text=["a.txt", "b.txt"])
    assert args.also_text == ["a.txt", "b.txt"] and "--also-text a.txt --also-text b.txt" in ev.command_line(args)
    assert eval_args("minilm", "", tokens=64, window=32, repeat=1, attn="eager").also_text == []


def test_cli_eval(llama_dir, files, capsys):
    from rewriter.cli import main
    code = main(["eval", llama_dir, "--pass", "lora{rank=2},lora-merge", "--text", files[0], "--window", "16",
                 "--max-tokens", "32", "--format", "json", "--repeat", "1"])
    assert code == 0
    r = json.loads(capsys.readouterr().out)
    assert r["metrics"]["top1_agreement"] == 1.0 and r["metrics"]["tokens"] == 32


def test_errors_are_one_line(llama_dir, bert_dir, tmp_path, files):
    cases = [
        ((bert_dir, "--metric", "ppl"), "causal LM"),
        ((llama_dir, "--metric", "cosine"), "encoders"),
        ((llama_dir, "--text", str(tmp_path / "none.txt")), "no such text file"),
        ((llama_dir, "--text", files[0], "--also-text", str(tmp_path / "none.txt")), "no such text file"),
        ((bert_dir, "--also-text", files[0]), "--also-text measures perplexity"),
        ((llama_dir, "--text", files[0], "--also-text", files[0], "--pass", f"lowrank{{data={files[0]}}}"),
         "the text it is evaluated on"),
        ((bert_dir, "--pairs", str(tmp_path / "none.json")), "no such sentence-pairs file"),
        (("demo:tiny-gpt", "--metric", "ppl"), "tokenizer"),
        ((str(tmp_path / "missing-model"),), "no such"),
        ((llama_dir, "--pass", "no-such-pass", "--text", files[0]), "no-such-pass"),
        (("demo:tiny-gpt", "--device", "cpu"), "--device applies to Hugging Face"),
        ((llama_dir, "--device", "tpu"), "bad --device"),
    ]
    for argv, needle in cases:
        with pytest.raises(UserError) as e:
            run_eval(*argv)
        assert needle in str(e.value) and "\n" not in str(e.value), (argv, str(e.value))


def test_rtn_baseline_spec():
    """--rtn BITS:GROUP (fp16 scale and zero point) or BITS:GROUP:SCALE_BITS (coded as shiftadd stores them)."""
    assert ev.parse_rtn("4:64") == (4, 64, 0) and ev.parse_rtn("4:32:6") == (4, 32, 6) and ev.parse_rtn("") is None
    for bad in ("4", "4:32:6:1", "x:32", "4:32:9", "9:32", "4:0"):
        with pytest.raises(UserError) as e:
            ev.parse_rtn(bad)
        assert "\n" not in str(e.value)
    from rewriter import bcq_fit
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    gm = torch.export.export(model, (torch.randn(2, 64),)).module()
    assert ev.round_to_nearest(gm, 4, 32, 6) == 2
    for i in (0, 2):
        rounded = gm.get_parameter(f"{i}.weight")
        assert torch.equal(rounded, bcq_fit.rtn(model[i].weight.detach(), 4, 32, scale_bits=6))
        assert not torch.equal(rounded, bcq_fit.rtn(model[i].weight.detach(), 4, 32))    # the codes cost something
