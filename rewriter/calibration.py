"""Calibration data and layer statistics, shared by the data-aware passes (`calibrate=N`) and `heal`.

One convention for every pass: `calibrate=N` samples (0 = data-free), `data=self|FILE`, `seq=T`, `seed`.

Data
    self   (default) a causal LM (token ids in, next-token logits out, position t independent of later tokens):
           N sequences sampled from the ORIGINAL model itself — first token uniform over the vocabulary, then
           temperature-1 sampling (LLM-QAT's data-free recipe: no download, no licence question, and never the
           evaluation text). A text encoder with a tokenizer (it cannot generate): windows of the built-in
           calibration text (data=builtin: rewriter/data/calibration_text.txt, ~2,200 words of everyday English
           written for this project, disjoint from the evaluation text and sentence pairs) — measured on MiniLM,
           random token sequences calibrate worse than no calibration at all. Any other model (no tokenizer, a
           classifier on features, a vision model): N random inputs drawn like its example inputs — token ids
           uniform over its embedding table, attention masks all ones, float inputs Gaussian with the example's
           per-feature mean and standard deviation: data-free and exciting every input direction, but not the
           model's real input distribution (give data=FILE for that).
    FILE   .txt (tokenised with the model's tokenizer, cut into windows of `seq` tokens; an encoder's windows
           get [CLS]/[SEP]), .jsonl (one {"text": ...} or {"input_ids": [...]} per line), .pt (an integer
           tensor (N, T) of token ids, or 1-D: one stream).
Shapes
    A program exported with static shapes (the default) only runs on inputs shaped like its example inputs, so
    calibration batches then have exactly that shape (seq = its sequence length; N is rounded up to whole
    batches). A program captured with dynamic shapes (--dynamic, dynamic=True) takes batches of `seq` tokens —
    except a model that is not a causal LM reading windows of a text, whose windows are as long as its example
    inputs when those are shorter: an encoder is calibrated on inputs like the ones it was exported for.
    Windows of a text shorter than `seq` count in tokens: N·seq/length of them (rows·seq/length a batch), as many
    tokens as N sequences of `seq` — MiniLM's `rewrite eval` program takes 14-token sentences, and 32 windows of
    them (616 rows) left the 1536-wide FFN inputs' Grams rank-deficient (shiftadd 3 bits: cosine 0.969 with 44
    windows, 0.976 with 308).
Sampling cost
    With the Hugging Face model the program came from (resources "hf_model", or the "source" alias/folder) the
    sequences are drawn with a KV cache: O(N·seq) token evaluations. Otherwise the program itself is run on
    growing prefixes (dynamic) or on full windows (static, causality makes the later positions irrelevant):
    O(N·seq²). Samples of big models (> 10M parameters) are cached on disk ($REWRITE_CACHE/calibration) by a
    fingerprint of the weights, so a benchmark that evaluates many pipelines samples once.
Statistics (captured once per pipeline, on the program as the first calibrating pass receives it — the original
model unless an earlier pass changed it — and reused by every later pass)
    per linear layer with input rows x (any layout `rewriter.matchers.linear` knows): the mean Gram
        H = Σ x·xᵀ / rows   (n × n, float32; x rows from every position of every calibration sample)
    so a layer's calibrated output error is  ‖X·(W − W')ᵀ‖² / rows = tr((W − W')·H·(W − W')ᵀ); the mean input
        μ = Σ x / rows   (n,; what a per-output offset can absorb: vq-logits' token bias);
    and for a causal LM the mean next-token distribution of the model, p̄ (V,).
Everything runs on the device of the program's inputs; sampling draws its random numbers from one CPU generator
seeded by `seed`, so the data are the same on every device.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import torch
from torch import fx
from torch.utils import _pytree as pytree

from .errors import UserError, first_line

BUILTIN_TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "calibration_text.txt")
DEFAULT_SAMPLES = 32
DEFAULT_SEQ = 128
BATCH_TOKENS = 2048          # rows per calibration batch of a dynamic program
DISK_CACHE_PARAMS = 10_000_000
_VERSION = "calib-v2"       # v2: inverse-CDF draws, 64 rows a batch with a KV cache


# ---- options ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataSpec:
    """Where calibration data come from and how much: the `data`, `calibrate`, `seq`, `seed` options of a pass."""

    data: str = "self"
    samples: int = DEFAULT_SAMPLES
    seq: int = DEFAULT_SEQ
    seed: int = 0


def check_options(data: str, samples: int, seq: int, what: str = "calibrate") -> None:
    """Option validation shared by every pass (ValueError -> one-line UserError from the spec parser)."""
    if samples < 0:
        raise ValueError(f"{what} must be >= 0 (calibration samples; 0 = data-free), got {samples}")
    if seq < 2:
        raise ValueError(f"seq must be >= 2 tokens, got {seq}")
    if data not in ("self", "builtin") and not data.endswith((".txt", ".jsonl", ".pt")):
        raise ValueError(f"data must be self, builtin or a .txt / .jsonl / .pt file, got {data!r}")


# ---- calling a program on flat inputs ----------------------------------------------------------------------------
def run_flat(gm: fx.GraphModule, flat: list, call=None):
    """The program's first output for flat inputs (placeholder order), through its generated code; `call` (a
    wrapper of gm such as DistributedDataParallel) is called instead of gm when given."""
    spec = getattr(gm, "_in_spec", None)
    if spec is not None:
        args, kwargs = pytree.tree_unflatten(list(flat), spec)
        out = (call or gm)(*args, **kwargs)
    elif call is not None:
        out = call(*flat)
    else:
        out = fx.Interpreter(gm).run(*flat)
    leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
    return leaves[0] if leaves else None


# ---- what the program takes and gives ----------------------------------------------------------------------------
@dataclass
class ModelIO:
    example: list                 # flat example inputs
    ids_index: int | None         # the token-id input (an integer tensor of ≥ 2 dims), if any
    mask_indices: list[int]       # other integer inputs shaped like the ids (attention masks: all ones)
    vocab: int | None             # rows of the embedding table the ids index
    lm: bool                      # next-token logits of a causal model
    dynamic: bool                 # the program accepts other batch sizes / lengths

    @property
    def batch(self) -> int:
        return int(self.example[self.ids_index].shape[0]) if self.ids_index is not None else 1

    @property
    def length(self) -> int:
        return int(self.example[self.ids_index].shape[-1]) if self.ids_index is not None else 1


def describe(ctx) -> ModelIO:
    """The program's inputs and outputs, cached for the pipeline."""
    cache = _cache(ctx)
    if "io" in cache:
        return cache["io"]
    flat = list(ctx.inputs)
    ids_index = next((i for i, t in enumerate(flat) if isinstance(t, torch.Tensor) and t.ndim >= 2
                      and not t.is_floating_point() and t.dtype != torch.bool), None)
    masks, vocab = [], None
    if ids_index is not None:
        ids = flat[ids_index]
        masks = [i for i, t in enumerate(flat) if i != ids_index and isinstance(t, torch.Tensor)
                 and not t.is_floating_point() and tuple(t.shape) == tuple(ids.shape)]
        vocab = _embedding_rows(ctx.gm, ids_index) or int(ids.max()) + 1
    dynamic = bool(ctx.resources.get("dynamic")) or _has_symbolic_sizes(ctx.gm)
    io = ModelIO(flat, ids_index, masks, vocab, False, dynamic)
    io.lm = _is_causal_lm(ctx, io)
    cache["io"] = io
    return io


def _embedding_rows(gm: fx.GraphModule, ids_index: int) -> int | None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if ids_index >= len(placeholders):
        return None
    ids_node = placeholders[ids_index]
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == torch.ops.aten.embedding.default \
                and node.args[1] is ids_node and node.args[0].op == "get_attr":
            from .ir import get_attr_value
            return int(get_attr_value(gm, node.args[0].target).shape[0])
    return None


def _has_symbolic_sizes(gm: fx.GraphModule) -> bool:
    return any(n.op == "call_function" and n.target == torch.ops.aten.sym_size.int for n in gm.graph.nodes)


def _is_causal_lm(ctx, io: ModelIO) -> bool:
    """Token ids in, (…, T, V) logits out, and the logits at position t do not depend on later tokens (checked on
    the example inputs by changing the last token, unless the entry point already knows)."""
    if io.ids_index is None:
        return False
    known = ctx.resources.get("causal")
    ids = io.example[io.ids_index]
    with torch.no_grad():
        out = run_flat(ctx.gm, io.example)
    if out is None or not out.is_floating_point() or out.ndim != ids.ndim + 1 or tuple(out.shape[:-1]) != tuple(ids.shape) \
            or out.shape[-1] < 2:
        return False
    if known is not None:
        return bool(known)
    if ids.shape[-1] < 2:
        return False
    changed = list(io.example)
    other = ids.clone()
    other[..., -1] = (other[..., -1] + 1) % max(io.vocab or 2, 2)
    changed[io.ids_index] = other
    with torch.no_grad():
        out2 = run_flat(ctx.gm, changed)
    scale = float(out[..., :-1, :].abs().max()) + 1e-30
    return float((out2[..., :-1, :] - out[..., :-1, :]).abs().max()) <= 1e-4 * scale


# ---- the pipeline-level cache -----------------------------------------------------------------------------------
def _cache(ctx) -> dict:
    return ctx.resources.setdefault("calibration", {})


def batches(ctx, spec: DataSpec, rows: int | None = None) -> list[list]:
    """Calibration inputs for the program: a list of flat input lists, `spec.samples` samples in all; `rows`
    samples per batch when the program's shapes are dynamic (default: up to BATCH_TOKENS tokens). Windows of a
    text shorter than `seq` (see `_seq`) count in tokens: N·seq / length of them, rows·seq / length a batch."""
    io = describe(ctx)
    key = ("batches", spec.data, spec.samples, _seq(ctx, io, spec), spec.seed, rows if io.dynamic else None)
    cache = _cache(ctx)
    if key not in cache:
        cache[key] = _make_batches(ctx, io, spec, rows)
    return cache[key]


def _seq(ctx, io: ModelIO, spec: DataSpec) -> int:
    """The calibration sequences' length: the program's own for a static program; for a dynamic one `seq`, except
    that a model that is not a causal LM reading windows of a text gets windows as long as its example inputs
    when those are shorter — an encoder is calibrated on inputs like the ones it was exported for (MiniLM's
    evaluation sentences are 14 tokens: shiftadd 3 bits then heal on 128-token windows lowered their cosine from
    0.969 to 0.959, on 16-token ones it raised it to 0.971)."""
    if io.ids_index is None:
        return spec.seq
    if not io.dynamic:
        return io.length
    if not io.lm and io.length < spec.seq and _reads_text(ctx, io, spec.data):
        return max(2, io.length)
    return spec.seq


def _per_token(ctx, io: ModelIO, spec: DataSpec, count: int) -> int:
    """`count` sequences of `seq` tokens as windows of the (shorter) calibration length, when those are windows
    of a text (cheap); else `count`."""
    seq = _seq(ctx, io, spec)
    if io.ids_index is not None and seq < spec.seq and _reads_text(ctx, io, spec.data):
        return -(-count * spec.seq // seq)
    return count


def _rows_per_batch(ctx, io: ModelIO, spec: DataSpec, rows: int | None = None) -> int:
    if io.ids_index is None:
        return max(1, int(io.example[0].shape[0])) if io.example and isinstance(io.example[0], torch.Tensor) \
            and io.example[0].ndim else 1
    if not io.dynamic:
        return io.batch
    samples = _per_token(ctx, io, spec, spec.samples)
    if rows is not None:
        return max(1, min(samples, _per_token(ctx, io, spec, rows)))
    return max(1, min(samples, BATCH_TOKENS // _seq(ctx, io, spec)))


def _make_batches(ctx, io: ModelIO, spec: DataSpec, rows: int | None = None) -> list[list]:
    if spec.samples < 1:
        return []
    rows = _rows_per_batch(ctx, io, spec, rows)
    n = _per_token(ctx, io, spec, spec.samples)     # windows of a text: as many tokens as N sequences of seq
    n = -(-n // rows) * rows if not io.dynamic else n
    device = _device(io)
    if io.ids_index is None:
        return _random_float_batches(io, n, rows, spec.seed)
    seq = _seq(ctx, io, spec)
    ids, source = _token_ids(ctx, io, spec.data, n, seq, spec.seed)
    ids = ids.to(device)
    out = []
    for start in range(0, ids.shape[0], rows):
        chunk = ids[start:start + rows]
        if not io.dynamic and chunk.shape[0] < rows:   # a static program: pad the last batch with repeats
            chunk = torch.cat([chunk, ids[: rows - chunk.shape[0]]])
        out.append(_inputs_for(io, chunk))
    _note(ctx, f"calibration data: {source}")
    return out


def _reads_text(ctx, io: ModelIO, data: str) -> bool:
    """The token ids come from a text or file (cheap windows), not from sampling the model or random ids."""
    return data != "self" or (not io.lm and tokenizer(ctx) is not None)


def _token_ids(ctx, io: ModelIO, data: str, n: int, seq: int, seed: int) -> tuple[torch.Tensor, str]:
    """(n, seq) int64 CPU token ids and a description; the first n of a larger set drawn earlier in the pipeline
    with the same (data, seq, seed) are reused (sampling draws the sequences in a fixed order)."""
    cache = _cache(ctx)
    key = ("ids", data, seq, seed)
    if key in cache and cache[key][0].shape[0] >= n:
        ids, source = cache[key]
        return ids[:n], source
    if data == "builtin" or (data == "self" and _reads_text(ctx, io, data)):
        ids = read_file_tokens(ctx, BUILTIN_TEXT, n, seq, io, seed)
        source = f"{ids.shape[0]} windows of {seq} tokens of the built-in calibration text"
    elif data != "self":
        ids = read_file_tokens(ctx, data, n, seq, io, seed)
        source = f"{ids.shape[0]} windows of {seq} tokens from {data}"
    elif io.lm:
        ids = sample_lm(ctx, io, n, seq, seed)
        source = f"{n} sequences of {seq} tokens sampled from the model itself (temperature 1)"
    else:
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, io.vocab, (n, seq), generator=gen, device="cpu")
        source = f"{n} random token sequences of {seq} (the model is not a causal LM; data=FILE for real text)"
    cache[key] = (ids, source)
    return ids, source


def _device(io: ModelIO):
    t = next((x for x in io.example if isinstance(x, torch.Tensor)), None)
    return t.device if t is not None else torch.device("cpu")


def _inputs_for(io: ModelIO, ids: torch.Tensor) -> list:
    flat = list(io.example)
    example_ids = io.example[io.ids_index]
    flat[io.ids_index] = ids.to(example_ids.dtype)
    for i in io.mask_indices:
        flat[i] = torch.ones(ids.shape, dtype=io.example[i].dtype, device=ids.device)
    return flat


def _random_float_batches(io: ModelIO, n: int, rows: int, seed: int) -> list[list]:
    """Inputs like the example ones: floats Gaussian with the example's per-feature (last dim) mean and std."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(max(1, -(-n // rows))):
        flat = []
        for t in io.example:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel():
                x = t.detach().double().reshape(-1, t.shape[-1]) if t.ndim else t.detach().double().reshape(1, 1)
                mean = x.mean(0)
                std = x.std(0, unbiased=False) if x.shape[0] > 1 else x.abs().clamp_min(1e-3)
                std = torch.where(std > 0, std, x.abs().mean().clamp_min(1e-3).expand_as(std))
                noise = torch.randn(t.shape, generator=gen, dtype=torch.float64, device="cpu")
                flat.append((noise * std.cpu() + mean.cpu()).to(dtype=t.dtype, device=t.device))
            else:
                flat.append(t)
        out.append(flat)
    return out


def _note(ctx, text: str) -> None:
    cache = _cache(ctx)
    notes = cache.setdefault("notes", set())
    if text not in notes:
        notes.add(text)
        ctx.message(text)


# ---- sampling from the model itself --------------------------------------------------------------------------------
def sample_lm(ctx, io: ModelIO, n: int, seq: int, seed: int) -> torch.Tensor:
    """(n, seq) int64 token ids on the CPU: first token uniform, then temperature-1 samples from the original
    model (its Hugging Face form with a KV cache when known, else the program)."""
    teacher = ctx.teacher if ctx.teacher is not None else ctx.gm
    big = sum(p.numel() for p in teacher.parameters()) > DISK_CACHE_PARAMS
    path = None
    if big:
        path = _disk_path(ctx, teacher, io, n, seq, seed)
        if path and os.path.isfile(path):
            try:
                ids = torch.load(path, weights_only=True)
                if tuple(ids.shape) == (n, seq):
                    return ids
            except Exception:
                pass
    hf_model = _hf_model(ctx)      # loaded only when the samples are not on disk yet
    with reading(ctx):
        if hf_model is not None:
            ids = _sample_hf(ctx, hf_model, io.vocab, n, seq, seed)
        else:
            ids = _sample_program(ctx, teacher, io, n, seq, seed)
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        torch.save(ids, tmp)
        os.replace(tmp, path)
    return ids


def reading(ctx):
    """A phase that only reads the model's weights (rewriter/lazy_weights.py: pages are unmapped, not evicted)."""
    from .lazy_weights import reading as store_reading
    return store_reading(ctx.resources.get("weight_store"))


def _hf_model(ctx):
    model = ctx.resources.get("hf_model")
    if model is not None:
        return model
    source = ctx.resources.get("source")
    if not isinstance(source, str) or ctx.resources.get("hf_model_tried"):
        return None
    ctx.resources["hf_model_tried"] = True
    try:
        from . import hf
        if not hf.is_hf_source(source):
            return None
        with torch.device("cpu"):   # the checkpoint's own device, whatever default device the caller set
            model, _, _, _ = hf.load_model(source)
    except Exception:
        return None
    if not getattr(model, "causal", False):
        return None
    ctx.resources["hf_model"] = model
    return model


def _draw(logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One temperature-1 sample per row by inverse CDF: the first token whose cumulative probability exceeds
    u ~ U(0, total), in float64, with u from the CPU generator `gen` (so the draws depend on the seed alone: given
    the same logits every device draws the same tokens, up to float64 rounding right at a boundary). CUDA logits
    stay on the GPU (the CPU's float64 softmax over a 64 × 49k batch takes ~45 ms a token on 2 threads: about half
    of the 254 s an H200 run spent drawing 768 × 256 tokens, by that estimate); returns the CPU indices.
    torch.multinomial took 2 ms a row on a 49k vocabulary (this: 0.55 ms on the CPU)."""
    logits = logits.detach()
    if logits.device.type != "cuda":
        logits = logits.cpu()
    cdf = torch.softmax(logits.double(), -1).cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, generator=gen, dtype=torch.float64, device="cpu").to(cdf.device)
    return torch.searchsorted(cdf, u * cdf[:, -1:], right=True)[:, 0].clamp_max(cdf.shape[-1] - 1).cpu()


def _sample_hf(ctx, model, vocab, n, seq, seed) -> torch.Tensor:
    inner = model.model if hasattr(model, "model") else model
    device = next(inner.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    rows = max(1, min(n, 64))        # a KV cache keeps 64 rows cheap; per sequence ~2.4x faster than 16 on a CPU
    out = []
    batches_ = list(range(0, n, rows))
    for start in ctx.progress(batches_, f"sampling {n} calibration sequences (KV cache)"):
        b = min(rows, n - start)
        ids = torch.randint(0, vocab, (b, 1), generator=gen, device="cpu")
        tokens = [ids]
        with torch.no_grad():
            res = inner(input_ids=ids.to(device), use_cache=True)
            for _ in range(seq - 1):
                nxt = _draw(res.logits[:, -1, :vocab], gen)[:, None]
                tokens.append(nxt)
                res = inner(input_ids=nxt.to(device), past_key_values=res.past_key_values, use_cache=True)
        out.append(torch.cat(tokens, 1))
    return torch.cat(out)


def _sample_program(ctx, gm, io: ModelIO, n, seq, seed) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rows = io.batch if not io.dynamic else max(1, min(n, 16))
    device = _device(io)
    out = []
    steps = [(start, t) for start in range(0, n, rows) for t in range(1, seq)]
    ids = None
    for start, t in ctx.progress(steps, f"sampling {n} calibration sequences from the program"):
        if t == 1:
            ids = torch.zeros(rows, seq, dtype=torch.long, device="cpu")
            ids[:, 0] = torch.randint(0, io.vocab, (rows,), generator=gen, device="cpu")
        prefix = ids[:, :t] if io.dynamic else ids
        with torch.no_grad():
            logits = run_flat(gm, _inputs_for(io, prefix.to(device)))
        ids[:, t] = _draw(logits[:, t - 1, :io.vocab], gen)
        if t == seq - 1:
            out.append(ids)
    if seq == 1:
        out = [torch.randint(0, io.vocab, (n, 1), generator=gen, device="cpu")]
    return torch.cat(out)[:n]


def _disk_path(ctx, gm, io, n, seq, seed) -> str | None:
    try:
        h = hashlib.sha256()
        h.update(f"{_VERSION}|{io.vocab}|{n}|{seq}|{seed}".encode())
        for name, t in sorted(gm.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
                     if t.numel() else b"")
    except Exception:
        return None
    root = os.environ.get("REWRITE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rewrite")
    return os.path.join(root, "calibration", f"{h.hexdigest()[:24]}.pt")


# ---- files -------------------------------------------------------------------------------------------------------
def tokenizer(ctx):
    """The model's tokenizer: resources["tokenizer"], or the one beside the source model, or None."""
    tok = ctx.resources.get("tokenizer")
    if tok is not None or ctx.resources.get("tokenizer_tried"):
        return tok
    ctx.resources["tokenizer_tried"] = True
    source = ctx.resources.get("source")
    try:
        from . import hf
        if isinstance(source, str) and hf.is_hf_source(source):
            folder, gguf = hf.resolve(source)
            if gguf is not None:
                folder = hf._from_gguf(folder, gguf)
            tok = hf.load_tokenizer(folder)
    except Exception:
        tok = None
    ctx.resources["tokenizer"] = tok
    return tok


def read_file_tokens(ctx, path: str, n: int, seq: int, io: ModelIO, seed: int = 0) -> torch.Tensor:
    """(n, seq) token ids from a .txt / .jsonl / .pt file: its non-overlapping windows of `seq` tokens, then, when
    it holds fewer than n, windows at random offsets (seeded: the same every run) until there are n — a short
    text gives as many distinct samples as asked (MiniLM's built-in text is 19 windows of 128 tokens: heal used
    to train on 16 of them). One-line UserErrors for every problem."""
    if not os.path.isfile(path):
        raise UserError(f"calibration data file {path} not found")
    stream: list[int] = []
    rows: list[list[int]] = []
    try:
        if path.endswith(".pt"):
            data = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(data, torch.Tensor) or data.is_floating_point() or data.ndim not in (1, 2):
                raise UserError(f"{path} must hold an integer tensor of token ids, (N, T) or (T,)")
            if data.ndim == 2:
                rows = [r.tolist() for r in data]
            else:
                stream = data.tolist()
        else:
            texts = []
            with open(path, encoding="utf-8") as f:
                if path.endswith(".jsonl"):
                    for i, line in enumerate(f, 1):
                        if not line.strip():
                            continue
                        record = json.loads(line)
                        if isinstance(record, dict) and isinstance(record.get("input_ids"), list):
                            stream.extend(int(v) for v in record["input_ids"])
                        elif isinstance(record, dict) and isinstance(record.get("text"), str):
                            texts.append(record["text"])
                        else:
                            raise UserError(f"{path} line {i}: expected {{\"text\": ...}} or {{\"input_ids\": [...]}}")
                else:
                    texts.append(f.read())
            if texts:
                tok = tokenizer(ctx)
                if tok is None:
                    raise UserError(f"calibration text {path} needs the model's tokenizer, and this model has none "
                                    "known; give token ids (.pt, or .jsonl with input_ids)")
                sep = [tok.eos_token_id] if getattr(tok, "eos_token_id", None) is not None else []
                for text in texts:
                    stream.extend(tok(text, add_special_tokens=False)["input_ids"] + sep)
    except UserError:
        raise
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot read calibration data {path}: {first_line(e)}") from None
    wrap = _special_wrap(ctx, io)
    body = seq - len(wrap[0]) - len(wrap[1])
    for r in rows:
        stream.extend(r)
    starts = list(range(0, len(stream) - body + 1, body))[:n]
    if not starts:
        raise UserError(f"calibration data {path} has {len(stream)} tokens, fewer than one window of {seq}")
    if len(starts) < n:      # more samples than the text has windows: the rest start at seeded random offsets
        gen = torch.Generator().manual_seed(seed)
        extra = torch.randint(0, len(stream) - body + 1, (n - len(starts),), generator=gen).tolist()
        _note(ctx, f"calibration data {os.path.basename(path)}: {len(stream)} tokens make {len(starts)} windows of "
                   f"{seq}; {len(extra)} more start at random offsets (overlapping them)")
        starts += extra
    ids = torch.tensor([wrap[0] + stream[s:s + body] + wrap[1] for s in starts], dtype=torch.long, device="cpu")
    if io.vocab is not None and (int(ids.max()) >= io.vocab or int(ids.min()) < 0):
        raise UserError(f"calibration data {path} has token ids outside the model's vocabulary (0..{io.vocab - 1})")
    return ids


def _special_wrap(ctx, io: ModelIO) -> tuple[list[int], list[int]]:
    """[CLS] … [SEP] around the windows of an encoder whose tokenizer has them; nothing for a causal LM."""
    if io.lm:
        return [], []
    tok = tokenizer(ctx)
    cls, sep = getattr(tok, "cls_token_id", None), getattr(tok, "sep_token_id", None)
    return ([cls] if cls is not None else []), ([sep] if sep is not None else [])


# ---- statistics ----------------------------------------------------------------------------------------------------
@dataclass
class LayerStats:
    """Per-layer input Grams (mean x·xᵀ) and means (mean x) keyed by layer name, and the LM's mean next-token
    distribution."""

    grams: dict[str, torch.Tensor] = field(default_factory=dict)
    rows: int = 0
    mean_probs: torch.Tensor | None = None
    source: str = ""
    means: dict[str, torch.Tensor] = field(default_factory=dict)

    def gram(self, name: str) -> torch.Tensor | None:
        return self.grams.get(name)

    def mean(self, name: str) -> torch.Tensor | None:
        return self.means.get(name)


GRAM_BUDGET: int | None = None     # bytes; None = $REWRITE_GRAM_BYTES, else DEFAULT_GRAM_BYTES (tests set it)
# 400 MiB: SmolLM2-135M's Grams (384 MiB: 30 layers of 3·576² + 1536² fp32) are still captured once and shared by
# every pass, while a 1B model (TinyLlama: 177 MB a decoder layer) is calibrated two decoder layers at a time.
# 512 MiB (three layers) put whole-model calibrated monarch on TinyLlama 0.03 GiB over the memory rule.
DEFAULT_GRAM_BYTES = 400 * 2**20
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}


def gram_budget() -> int:
    """The Gram memory budget in bytes: GRAM_BUDGET, else $REWRITE_GRAM_BYTES (a byte count, or with a K/M/G
    suffix: 512M, 4G), else DEFAULT_GRAM_BYTES (400 MiB). A malformed value is the user's one-line error, not a
    traceback."""
    if GRAM_BUDGET is not None:
        return GRAM_BUDGET
    return env_bytes("REWRITE_GRAM_BYTES", DEFAULT_GRAM_BYTES)


def env_bytes(name: str, default: int, allow_zero: bool = False) -> int:
    """A byte count from the environment variable `name` (digits, or with a K/M/G suffix: 512M, 4G), `default`
    when unset; a malformed value (or 0 unless `allow_zero`) is the user's one-line error."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    number, unit = raw.rstrip("KMGkmgBb"), raw[len(raw.rstrip("KMGkmgBb")):].upper().rstrip("B")
    try:
        value = int(float(number) * _UNITS[unit])
    except (ValueError, KeyError):
        value = -1
    if value < 0 or (value == 0 and not allow_zero):
        kind = "a non-negative" if allow_zero else "a positive"
        raise UserError(f"{name}={raw!r} is not {kind} byte count; give e.g. 536870912, 512M or 4G")
    return value


def gram_bytes(sites) -> int:
    """Bytes of the fp32 Grams of these linear sites (one per distinct input: q/k/v share theirs)."""
    return sum(s.in_features ** 2 * 4 for s in {s.x: s for s in sites}.values())


def layer_stats(ctx, spec: DataSpec, sites=None) -> LayerStats:
    """Grams of the inputs of the program's linear layers on the calibration data.

    When the Grams of every linear of the program fit in GRAM_BUDGET ($REWRITE_GRAM_BYTES, default 400 MiB —
    every model in the tests, SmolLM2, MiniLM) they are captured once per pipeline per `spec`, on the program as
    the first calibrating pass receives it, and shared by every later pass (`sites` is then ignored). Past that
    (a 1B model's Grams take ~4 GB, an 8B model's ~32 GB) only the Grams of `sites` are captured, on the program
    as it is now, and not kept: passes walk their layers in chunks of at most the budget (`site_chunks`) and
    rewrite them once every chunk has been fitted, so every chunk still sees the program the pass received."""
    from .matchers.linear import find_linears
    key = ("stats", spec.data, spec.samples, spec.seq, spec.seed)
    cache = _cache(ctx)
    if key in cache:
        return cache[key]
    every = find_linears(ctx.gm)
    whole = gram_bytes(every) <= gram_budget() or sites is None
    stats = _capture_stats(ctx, spec, every if whole else list(sites))
    if whole:
        cache[key] = stats
    return stats


def site_chunks(ctx, spec: DataSpec, sites: list) -> list[list]:
    """`sites` cut into consecutive chunks whose Grams fit GRAM_BUDGET (one chunk when every Gram of the program
    fits, or without calibration)."""
    from .matchers.linear import find_linears
    budget = gram_budget() if spec.samples > 0 else 0
    if spec.samples <= 0 or gram_bytes(find_linears(ctx.gm)) <= budget:
        return [list(sites)] if sites else []
    chunks, chunk, inputs = [], [], set()
    for s in sites:
        grows = s.x not in inputs
        if chunk and grows and gram_bytes(chunk) + s.in_features ** 2 * 4 > budget:
            chunks.append(chunk)
            chunk, inputs = [], set()
        chunk.append(s)
        inputs.add(s.x)
    if chunk:
        chunks.append(chunk)
    return chunks


def _capture_stats(ctx, spec: DataSpec, sites: list) -> LayerStats:
    io = describe(ctx)
    long = _hf_stats(ctx, io, spec, sites)
    if long is not None:
        return long
    data = batches(ctx, spec)
    by_input: dict[fx.Node, list[str]] = {}
    for s in sites:
        by_input.setdefault(s.x, []).append(s.name)
    sums: dict[fx.Node, torch.Tensor] = {}
    counts: dict[fx.Node, int] = {}
    probs_sum, prob_rows = None, 0

    class Capture(fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if n in by_input and isinstance(value, torch.Tensor) and value.is_floating_point():
                _accumulate(sums, counts, n, value)
            return value

    with torch.no_grad(), reading(ctx):
        for flat in ctx.progress(data, f"capturing layer statistics ({len(sites)} layers)"):
            out = Capture(ctx.gm).run(*flat)
            if io.lm:
                logits = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)][0]
                probs_sum = _add_probs(probs_sum, logits)
                prob_rows += logits.numel() // logits.shape[-1]
    return _layer_stats(spec, by_input, sums, counts, probs_sum, prob_rows)


def node_values(ctx, spec: DataSpec, nodes: list, what: str, rows: int | None = None):
    """For each calibration batch (`batches`, `rows` samples a batch for a dynamic program), {node: its value}
    for `nodes`, as the program computes them now — one fx.Interpreter run a batch; a generator, so the caller
    reduces each batch before the next is computed."""
    wanted = set(nodes)

    class Capture(fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            if n in wanted:
                seen[n] = value
            return value

    with torch.no_grad(), reading(ctx):
        for flat in ctx.progress(batches(ctx, spec, rows), what):
            seen: dict = {}
            Capture(ctx.gm).run(*flat)
            yield seen


def _accumulate(sums: dict, counts: dict, key, value: torch.Tensor) -> None:
    """Add one input batch's x·xᵀ and Σx (rows: every position) to the running sums of `key`."""
    x = value.detach().reshape(-1, value.shape[-1]).float()
    g, v = x.t() @ x, x.sum(0, dtype=torch.float64)
    if key in sums:
        sums[key][0].add_(g)
        sums[key][1].add_(v)
    else:
        sums[key] = [g, v]
    counts[key] = counts.get(key, 0) + x.shape[0]


def _layer_stats(spec: DataSpec, by_input: dict, sums: dict, counts: dict, probs_sum, prob_rows: int) -> LayerStats:
    """The mean Grams and means (one per distinct input, shared by the layer names reading it) and mean next-token
    distribution from the running sums."""
    stats = LayerStats(source=spec.data)
    for node, names in by_input.items():
        if node in sums:
            g, v = sums.pop(node)
            h, mean = g.div_(max(counts[node], 1)), (v / max(counts[node], 1)).float()
            for name in names:
                stats.grams[name] = h
                stats.means[name] = mean
            stats.rows = max(stats.rows, counts[node])
    if probs_sum is not None:
        stats.mean_probs = (probs_sum / max(prob_rows, 1)).float()
    return stats


def _same_weight(a: torch.Tensor, b: torch.Tensor, whole: int = 1 << 20) -> bool:
    """Equal tensors; past `whole` elements only their first and last 8 rows are compared, so that a big model's
    weights mapped from its checkpoint are not all read into memory for this (the agreement of program and model on
    the example inputs is checked besides)."""
    if a.numel() <= whole or a.ndim < 2 or a.shape[0] <= 16:
        return torch.equal(a, b)
    return torch.equal(a[:8], b[:8]) and torch.equal(a[-8:], b[-8:])


def _add_probs(total: torch.Tensor | None, logits: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """total + Σ over positions of softmax(logits) in float64, `chunk` positions at a time: one float64 copy of a
    2,048-position batch over a 32,000-token vocabulary is 0.5 GB (measured: +1.4 GiB on TinyLlama-1.1B)."""
    flat = logits.detach().reshape(-1, logits.shape[-1])
    for s in range(0, flat.shape[0], chunk):
        p = torch.softmax(flat[s:s + chunk].double(), -1).sum(0)
        total = p if total is None else total + p
    return total


class _NotTheProgram(Exception):
    """The Hugging Face model's hooks do not see what the program's layers see."""


def hf_modules(ctx, io: ModelIO, spec: DataSpec, sites: list):
    """(the Hugging Face model a static causal-LM program computes, {site name: its nn.Linear module}) when
    statistics should be taken on it instead of the program — the program's inputs are shorter than `seq` tokens
    (`rewrite smollm2` exports 2×16 tokens) and it still computes that model: no pass has rewritten a node yet,
    every site's weight is the module's own (same dtype, equal), and program and model agree on the example
    inputs. None otherwise (the caller then runs the program itself on inputs of its static shape)."""
    from .ir import provenance
    if io.dynamic or not io.lm or io.ids_index is None or io.length >= spec.seq or spec.samples < 1:
        return None
    if any(provenance(n) for n in ctx.gm.graph.nodes):
        return None
    model = _hf_model(ctx)
    if model is None:
        return None
    modules: dict[str, torch.nn.Module] = {}
    try:
        for s in sites:
            path, _, leaf = s.weight_name.rpartition(".")
            module = model.get_submodule(path) if leaf == "weight" and path else None
            w = getattr(module, "weight", None)
            mine = s.weight_tensor(ctx.gm)
            if not isinstance(w, torch.Tensor) or w.shape != mine.shape or w.dtype != mine.dtype \
                    or w.device != mine.device or not _same_weight(w, mine):
                return None
            modules[s.name] = module
        if not modules:
            return None
        with torch.no_grad(), reading(ctx):
            ids = io.example[io.ids_index].to(device=mine.device, dtype=torch.long)
            want = run_flat(ctx.gm, list(io.example)).float()
            got = model(ids).float()
        if got.shape != want.shape or float((got - want).norm()) > 1e-2 * float(want.norm()):
            return None
    except Exception:        # a module path that is not the program's, a model that does not run alone: the program
        return None
    return model, modules


def hf_batches(ctx, io: ModelIO, spec: DataSpec, device) -> tuple[list[torch.Tensor], str]:
    """The token batches statistics are taken on through the Hugging Face model (`hf_modules`): `spec.samples`
    sequences of `spec.seq` tokens, BATCH_TOKENS tokens a batch, on `device`; and where they came from."""
    ids, source = _token_ids(ctx, io, spec.data, spec.samples, spec.seq, spec.seed)
    rows = max(1, BATCH_TOKENS // spec.seq)
    return [ids[s:s + rows].to(device) for s in range(0, ids.shape[0], rows)], source


def _hf_stats(ctx, io: ModelIO, spec: DataSpec, sites: list) -> LayerStats | None:
    """Statistics of a static causal-LM program whose inputs are shorter than `seq` tokens (`rewrite smollm2`
    exports 2×16 tokens), taken on seq-long sequences from the Hugging Face model it was captured from, with
    forward hooks on the same linear modules (`hf_modules` says when). Without this the program could only be
    calibrated on 16-token sequences: measured on SmolLM2 (shiftadd 4 bits, held-out output error per layer,
    geometric mean of 10 layers, `python -m bench.quant_layers`) 0.095 with 32×16 tokens against 0.072 with 32×128;
    round-to-nearest: 0.074."""
    found = hf_modules(ctx, io, spec, sites)
    if found is None:
        return None
    model, modules = found
    device = next(iter(modules.values())).weight.device
    hooked: dict[fx.Node, torch.nn.Module] = {}
    by_input: dict[fx.Node, list[str]] = {}
    widths: dict[fx.Node, int] = {}
    for s in sites:
        hooked.setdefault(s.x, modules[s.name])       # q/k/v share one input: the first one's hook sees it
        widths[s.x] = s.in_features
        by_input.setdefault(s.x, []).append(s.name)
    sums: dict[fx.Node, torch.Tensor] = {}
    counts: dict[fx.Node, int] = {}

    def hook_for(node, width):
        def hook(module, args, out):
            if not args or not isinstance(args[0], torch.Tensor) or args[0].shape[-1] != width:
                raise _NotTheProgram()
            _accumulate(sums, counts, node, args[0])
        return hook

    inputs, source = hf_batches(ctx, io, spec, device)
    handles = [m.register_forward_hook(hook_for(node, widths[node])) for node, m in hooked.items()]
    probs_sum, prob_rows = None, 0
    try:
        with torch.no_grad(), reading(ctx):
            for batch in ctx.progress(inputs, f"capturing layer statistics ({len(sites)} layers, {spec.seq}-token "
                                              f"sequences)"):
                logits = model(batch)
                if len(counts) != len(hooked) or any(c != prob_rows + batch.numel() for c in counts.values()):
                    raise _NotTheProgram()   # a module called more (a layer shared by two inputs) or less than once
                probs_sum = _add_probs(probs_sum, logits)
                prob_rows += logits.numel() // logits.shape[-1]
    except _NotTheProgram:
        return None
    finally:
        for h in handles:
            h.remove()
    _note(ctx, f"calibration data: {source} (the program's inputs are {io.length} tokens long: statistics taken "
               f"on the Hugging Face model it computes, with hooks on the same layers)")
    return _layer_stats(spec, by_input, sums, counts, probs_sum, prob_rows)


def spec_of(pass_obj) -> DataSpec:
    """The DataSpec of a pass with the shared options (calibrate, data, seq, seed)."""
    return DataSpec(getattr(pass_obj, "data", "self"), int(getattr(pass_obj, "calibrate", 0)),
                    int(getattr(pass_obj, "seq", DEFAULT_SEQ)), int(getattr(pass_obj, "seed", 0)))


def output_error(h: torch.Tensor, w: torch.Tensor, approx: torch.Tensor) -> float:
    """Calibrated relative output error sqrt(tr(ΔW·H·ΔWᵀ) / tr(W·H·Wᵀ)) (bias not included), float64."""
    hd = h.double()
    wd = w.double()
    d = wd - approx.double()
    num = ((d @ hd) * d).sum()
    den = ((wd @ hd) * wd).sum()
    return float((num.clamp_min(0) / den.clamp_min(1e-300)).sqrt())
