"""Tiny Hugging Face models built from configs in code (random weights, no downloads), one per architecture
family people rewrite: decoder LMs, encoders, a vision encoder and encoder-decoders. `save(name, folder)` writes
one with save_pretrained; some are stored in bf16 so the checkpoint-dtype path is exercised too."""
from __future__ import annotations

import torch

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
VOCAB = 96


def _configs(transformers):
    t = transformers
    return {
        "llama": (t.LlamaConfig, dict(SMALL, vocab_size=VOCAB, num_key_value_heads=2, max_position_embeddings=64),
                  t.LlamaForCausalLM, torch.bfloat16),
        "qwen2": (t.Qwen2Config, dict(SMALL, vocab_size=VOCAB, num_key_value_heads=2, max_position_embeddings=64),
                  t.Qwen2ForCausalLM, torch.bfloat16),
        "mistral": (t.MistralConfig, dict(SMALL, vocab_size=VOCAB, num_key_value_heads=2,
                                          max_position_embeddings=64, sliding_window=8),
                    t.MistralForCausalLM, torch.float32),
        "gemma2": (t.Gemma2Config, dict(SMALL, vocab_size=VOCAB, num_key_value_heads=2, head_dim=8,
                                        max_position_embeddings=64, sliding_window=8),
                   t.Gemma2ForCausalLM, torch.float32),
        "phi3": (t.Phi3Config, dict(SMALL, vocab_size=VOCAB, num_key_value_heads=2, max_position_embeddings=64,
                                    pad_token_id=0), t.Phi3ForCausalLM, torch.float16),
        "gpt2": (t.GPT2Config, dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=VOCAB),
                 t.GPT2LMHeadModel, torch.float32),
        "gpt_neox": (t.GPTNeoXConfig, dict(SMALL, vocab_size=VOCAB, max_position_embeddings=64),
                     t.GPTNeoXForCausalLM, torch.float32),
        "opt": (t.OPTConfig, dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                                  word_embed_proj_dim=32, vocab_size=VOCAB, max_position_embeddings=64),
                t.OPTForCausalLM, torch.float32),
        "bert": (t.BertConfig, dict(SMALL, vocab_size=VOCAB, max_position_embeddings=64), t.BertModel,
                 torch.float32),
        "vit": (t.ViTConfig, dict(SMALL, image_size=32, patch_size=8), t.ViTModel, torch.float32),
        "t5": (t.T5Config, dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                decoder_start_token_id=0), t.T5ForConditionalGeneration, torch.float32),
        "bart": (t.BartConfig, dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                                    encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                    decoder_ffn_dim=64, max_position_embeddings=64),
                 t.BartForConditionalGeneration, torch.bfloat16),
    }


def names() -> list[str]:
    return ["llama", "qwen2", "mistral", "gemma2", "phi3", "gpt2", "gpt_neox", "opt", "bert", "vit", "t5", "bart"]


def save(name: str, folder) -> tuple[str, torch.dtype, str | None]:
    """Write model `name` to `folder`; returns (folder, stored dtype, --input-shape to use or None)."""
    import transformers
    config_cls, kwargs, model_cls, dtype = _configs(transformers)[name]
    torch.manual_seed(0)
    config = config_cls(**kwargs)
    model = model_cls(config).to(dtype)
    model.save_pretrained(str(folder))
    return str(folder), dtype, ("2x3x32x32" if name == "vit" else None)


def write_gguf(path, quantised: bool = True) -> str:
    """A tiny Llama-architecture GGUF file (2 layers, vocabulary 64): 2-D weights Q8_0 (quantised=True) or F16,
    norms F32, with a token list so transformers can build its config and tokenizer."""
    import numpy as np
    import gguf
    vocab, dim, ffn, layers, heads, kv_heads = 64, 32, 64, 2, 4, 2
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(64)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(vocab)
    w.add_rope_dimension_count(dim // heads)
    w.add_tokenizer_model("llama")
    w.add_token_list([f"t{i}" for i in range(vocab)])
    w.add_token_scores([0.0] * vocab)
    w.add_token_types([1] * vocab)
    rng = np.random.default_rng(0)

    def tensor(name, shape, weight=True):
        a = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if not weight:
            w.add_tensor(name, a)
        elif quantised:
            w.add_tensor(name, gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, a.astype(np.float16))
    tensor("token_embd.weight", (vocab, dim))
    tensor("output_norm.weight", (dim,), weight=False)
    tensor("output.weight", (vocab, dim))
    kv = dim // heads * kv_heads
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", (dim,), weight=False)
        tensor(f"blk.{i}.ffn_norm.weight", (dim,), weight=False)
        for name, shape in (("attn_q", (dim, dim)), ("attn_k", (kv, dim)), ("attn_v", (kv, dim)),
                            ("attn_output", (dim, dim)), ("ffn_gate", (ffn, dim)), ("ffn_up", (ffn, dim)),
                            ("ffn_down", (dim, ffn))):
            tensor(f"blk.{i}.{name}.weight", shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)
