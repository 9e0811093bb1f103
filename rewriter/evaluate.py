"""`rewrite eval MODEL --pass SPEC`: the original program and the rewritten one, side by side, on real inputs.

Metrics (--metric, chosen from the model when not given):
    ppl     causal LMs with a tokenizer: perplexity on a text (rewriter/data/eval_text.txt by default: 2,819
            SmolLM2 tokens of public-domain text), cut into non-overlapping windows of --window tokens (default
            256, capped at the model's context) — at most --max-tokens in all (default 2,048, so a perplexity is
            not a 128-token anecdote); NLL of token t+1 from
            positions ≤ t. Also next-token agreement: top-1 (same argmax), top-5 (the original's top-1 is in the
            rewritten top 5) and KL(p_original ‖ p_rewritten), averaged over positions. `--also-text FILE`
            (repeatable): the same figures on other texts, through the same two programs (metrics.also) — the
            default text is famous (the Declaration of Independence, Pride and Prejudice): a small model half
            knows it by heart, and a compressed one loses that first.
    cosine  encoders with a tokenizer: sentence embeddings by mean pooling over the attention mask, on the
            sentences of rewriter/data/sentence_pairs.json; cosine(original, rewritten) per sentence, and the Spearman
            correlation between the pairwise similarities before and after (rank agreement); also each
            model's Spearman against the human scores stored with the pairs.
    agree   any model (demo:NAME, .pt2, ...): on its example inputs, normwise relative error of the output and,
            for outputs with a class dimension, top-1/top-5 agreement and KL over the last dimension.

Always: normwise output error, per-pass site counts and per-layer figures (report.passes[i].sites), skipped
sites with their reasons, parameters, bytes of the program's tensors, and forward time (median, same inputs).
The exported programs have static shapes, so they are exported with exactly the batch they are evaluated on —
except for pipelines with a training pass (heal), which are captured with dynamic shapes so that training can
use its own batch size and sequence length.
Calibration (the data-aware passes, heal) never sees the evaluation text: passes sample their data from the model
itself (data=self) or read a file, and a data= file that is the evaluation text is refused.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections import Counter

import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from .errors import UserError

METRICS = ("ppl", "cosine", "agree")
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
DEFAULT_TEXT = os.path.join(DATA_DIR, "eval_text.txt")
DEFAULT_PAIRS = os.path.join(DATA_DIR, "sentence_pairs.json")
DEFAULT_MAX_TOKENS = 2048
DEFAULT_WINDOW = 256


def add_arguments(parser) -> None:
    """Options of `rewrite eval` (the CLI adds the positional MODEL: HF folder, .gguf, alias, demo:NAME, .pt2)."""
    parser.add_argument("--pass", dest="passes", default="", metavar="SPEC",
                        help='pipeline to evaluate, e.g. "lora{rank=8},lora-merge"')
    parser.add_argument("--metric", choices=METRICS, default=None,
                        help="ppl (causal LM), cosine (encoder), agree (any model); default: from the model")
    parser.add_argument("--text", default=None, metavar="FILE", help="text for perplexity (default: rewriter/data/eval_text.txt)")
    parser.add_argument("--also-text", dest="also_text", action="append", default=[], metavar="FILE",
                        help="another text to measure perplexity on, the same programs (repeatable; e.g. one the "
                             "model has not memorised beside a famous one)")
    parser.add_argument("--pairs", default=None, metavar="FILE",
                        help="sentence pairs JSON for --metric cosine (default: rewriter/data/sentence_pairs.json)")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                        help=f"at most this many tokens of --text (default {DEFAULT_MAX_TOKENS})")
    parser.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                        help=f"tokens per window (capped at the model's context; default {DEFAULT_WINDOW})")
    parser.add_argument("--format", choices=("table", "json"), default="table")
    parser.add_argument("--gguf", default=None, metavar="FILE", help="GGUF weights file (in MODEL's folder or a path)")
    parser.add_argument("--attn", choices=("eager", "sdpa"), default="eager",
                        help="HF attention implementation: eager shows softmax to passes, sdpa is one node")
    parser.add_argument("--input-shape", default=None, metavar="SHAPES",
                        help="example inputs for --metric agree, e.g. 2x16:int64")
    parser.add_argument("--verify", action="store_true", help="check each pass's contract on the eval inputs")
    parser.add_argument("--repeat", type=int, default=3, help="forward runs timed per program (median; default 3)")
    parser.add_argument("--rtn", default=None, metavar="BITS:GROUP[:SCALE_BITS]",
                        help="baseline: before the pipeline, round every linear weight but the LM head to nearest "
                             "(asymmetric min/max, BITS bits per GROUP weights, fp16 scale and zero point, or "
                             "SCALE_BITS-bit codes of them as shiftadd's default stores them: 4:32:6)")
    parser.add_argument("--trust-pickle", action="store_true", help="allow .pt files that hold pickled modules")
    parser.add_argument("--device", default=None, metavar="DEV",
                        help="load a Hugging Face model on DEV (e.g. cuda) and run the pipeline, heal and the "
                             "evaluation there (default: cpu)")


# ------------------------------------------------------------------------------------------------- inputs
def _read_text(path: str | None) -> str:
    path = path or DEFAULT_TEXT
    if not os.path.isfile(path):
        raise UserError(f"no such text file: {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise UserError(f"{path} is empty")
    return text


def read_pairs(path: str | None) -> list[dict]:
    path = path or DEFAULT_PAIRS
    if not os.path.isfile(path):
        raise UserError(f"no such sentence-pairs file: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            pairs = json.load(f)
        pairs = [{"a": str(p["a"]), "b": str(p["b"]), "score": float(p.get("score", "nan"))} for p in pairs]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} must be a JSON list of {{\"a\": ..., \"b\": ..., \"score\": ...}} ({e})") from e
    if len(pairs) < 3:
        raise UserError(f"{path} needs at least 3 pairs for a rank correlation")
    return pairs


def text_windows(tokenizer, text: str, window: int, max_tokens: int) -> torch.Tensor:
    """Token ids of `text`, cut into non-overlapping windows: (n_windows, window) int64."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    if len(ids) < 2:
        raise UserError("the text has fewer than 2 tokens")
    window = max(2, min(window, len(ids)))
    n = len(ids) // window
    return torch.tensor(ids[:n * window], dtype=torch.long).view(n, window)


# ------------------------------------------------------------------------------------------------- metrics
def next_token_metrics(logits_ref: torch.Tensor, logits_new: torch.Tensor, ids: torch.Tensor | None) -> dict:
    """Perplexity of both (when ids are given), top-1/top-5 agreement and KL(ref ‖ new) over positions."""
    ref = logits_ref.detach().double().flatten(0, -2)
    new = logits_new.detach().double().flatten(0, -2)
    out = {}
    if ids is not None:
        v = logits_ref.shape[-1]
        target = ids[:, 1:].reshape(-1)
        for key, logits in (("ppl_original", logits_ref), ("ppl_rewritten", logits_new)):
            nll = F.cross_entropy(logits[:, :-1].double().reshape(-1, v), target)
            out[key] = math.exp(float(nll))
    k = min(5, ref.shape[-1])
    top1_ref = ref.argmax(-1)
    out["top1_agreement"] = float((new.argmax(-1) == top1_ref).double().mean())
    out["top5_agreement"] = float((new.topk(k, -1).indices == top1_ref[:, None]).any(-1).double().mean())
    logp_ref, logp_new = F.log_softmax(ref, -1), F.log_softmax(new, -1)
    out["kl"] = float((logp_ref.exp() * (logp_ref - logp_new)).sum(-1).mean())
    return out


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def spearman(a, b) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    ra, rb = _ranks(torch.as_tensor(a, dtype=torch.float64)), _ranks(torch.as_tensor(b, dtype=torch.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom > 0 else float("nan")


def _ranks(x: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=x.dtype)
    for value in torch.unique(x):           # average the ranks of ties
        tie = x == value
        if int(tie.sum()) > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def embedding_metrics(hid_ref, hid_new, mask, n_pairs: int, human) -> dict:
    emb_ref = mean_pool(hid_ref.detach().double().cpu(), mask.cpu())
    emb_new = mean_pool(hid_new.detach().double().cpu(), mask.cpu())
    cos = F.cosine_similarity(emb_ref, emb_new, dim=-1)

    def pair_sims(emb):
        e = F.normalize(emb, dim=-1)
        return (e[:n_pairs] * e[n_pairs:]).sum(-1)

    sims_ref, sims_new = pair_sims(emb_ref), pair_sims(emb_new)
    out = {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
           "spearman_pairs": spearman(sims_ref, sims_new),
           "pair_sim_max_abs_change": float((sims_ref - sims_new).abs().max())}
    human = torch.tensor(human, dtype=torch.float64)
    if torch.isfinite(human).all():
        out["spearman_human_original"] = spearman(sims_ref, human)
        out["spearman_human_rewritten"] = spearman(sims_new, human)
    return out


def output_error(ref, new) -> float:
    from .verify import relative_error
    return relative_error(pytree.tree_leaves(ref), pytree.tree_leaves(new))


def program_bytes(program: torch.export.ExportedProgram) -> int:
    """Bytes of the distinct tensors a saved program holds (parameters, buffers, constants)."""
    seen, total = set(), 0
    for t in list(program.state_dict.values()) + list(getattr(program, "constants", {}).values()):
        if not isinstance(t, torch.Tensor):
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def program_params(program: torch.export.ExportedProgram) -> int:
    seen, total = set(), 0
    for name in program.graph_signature.parameters:
        t = program.state_dict[name]
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel()
    return total


def _synchronize(args) -> None:
    for t in pytree.tree_leaves(args):
        if isinstance(t, torch.Tensor) and t.device.type == "cuda":
            torch.cuda.synchronize(t.device)
            return


def time_forward(modules, args, kwargs, repeat: int) -> list[float]:
    """Median forward time of each module; runs alternate between them so load drift hits both alike."""
    times = [[] for _ in modules]
    with torch.no_grad():
        for _ in range(max(1, repeat)):
            for i, module in enumerate(modules):
                _synchronize(args)
                start = time.perf_counter()
                module(*args, **kwargs)
                _synchronize(args)
                times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


# ------------------------------------------------------------------------------------------------- driver
def prepare(args, dynamic: bool = False):
    """-> (Captured, metric, extra) where extra holds what the metric needs (ids, mask, human scores) and the
    resources the passes may use (the loaded model for sampling calibration data, its tokenizer)."""
    from .capture import capture
    from .hf import is_hf_source, load_model, example_inputs
    from .parallel import check_device

    metric = args.metric
    extra: dict = {"resources": {"source": args.model}}
    device = check_device(getattr(args, "device", None))
    if device is not None and not is_hf_source(args.model):
        raise UserError(f"--device applies to Hugging Face folders, GGUF files and aliases, not {args.model}")
    if is_hf_source(args.model):
        model, tokenizer, config, _ = load_model(args.model, gguf=getattr(args, "gguf", None),
                                                 attn_implementation=args.attn)
        if device is not None:
            model.to(device)
        kwargs = {"use_cache": False} if model.causal else {}
        if metric is None:
            metric = ("ppl" if model.causal else "cosine") if tokenizer is not None else "agree"
        if metric in ("ppl", "cosine") and tokenizer is None:
            raise UserError(f"--metric {metric} needs a tokenizer in the model folder; use --metric agree")
        if metric == "ppl":
            if not model.causal:
                raise UserError("--metric ppl needs a causal LM; use --metric cosine for encoders")
            context = int(getattr(config, "max_position_embeddings", args.window) or args.window)
            ids = text_windows(tokenizer, _read_text(args.text), min(args.window, context), args.max_tokens)
            ids = ids.to(device) if device is not None else ids
            inputs = (ids,)
            extra["ids"] = ids
        elif metric == "cosine":
            if model.causal:
                raise UserError("--metric cosine is for encoders; use --metric ppl for causal LMs")
            pairs = read_pairs(args.pairs)
            sentences = [p["a"] for p in pairs] + [p["b"] for p in pairs]
            inputs = _to(example_inputs(model, tokenizer, config, text=sentences), device)
            extra.update(mask=inputs[1], n_pairs=len(pairs), human=[p["score"] for p in pairs])
        else:
            inputs = _to(example_inputs(model, tokenizer, config, input_shape=args.input_shape), device)
        extra["resources"].update(hf_model=model, tokenizer=tokenizer, causal=model.causal)
        return capture(model, inputs, kwargs, dynamic=dynamic), metric, extra
    metric = metric or "agree"
    if metric != "agree":
        raise UserError(f"--metric {metric} needs a Hugging Face model with a tokenizer; use --metric agree")
    captured = capture(args.model, trust_pickle=getattr(args, "trust_pickle", False),
                       input_shapes=getattr(args, "input_shape", None), dynamic=dynamic)
    return captured, metric, extra


def _to(inputs: tuple, device) -> tuple:
    return inputs if device is None else tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in inputs)


def evaluate(args) -> dict:
    """Run the pipeline and measure; returns the JSON-able results."""
    from .api import run_captured
    from .pass_base import parse_pipeline

    pipeline = parse_pipeline(args.passes) if args.passes else []
    check_disjoint(pipeline, args)
    trains = any(getattr(p, "needs_teacher", False) for p in pipeline)
    rtn = parse_rtn(getattr(args, "rtn", None))
    captured, metric, extra = prepare(args, dynamic=trains)
    also = also_windows(args, metric, extra, dynamic=trains)
    original = captured.program
    if rtn is not None:
        round_to_nearest(captured.gm, *rtn)
    result = run_captured(captured, pipeline, verify=getattr(args, "verify", False),
                          resources=extra["resources"], progress=getattr(args, "progress", None))
    ref_mod, new_mod = original.module(), result.program.module()
    a, kw = captured.args, captured.kwargs
    with torch.no_grad():
        out_ref, out_new = ref_mod(*a, **kw), new_mod(*a, **kw)
    metrics = {"output_error": output_error(out_ref, out_new)}
    if metric == "ppl":
        metrics.update(next_token_metrics(out_ref, out_new, extra["ids"]))
        metrics["tokens"] = int(extra["ids"].numel())
        metrics["windows"] = list(extra["ids"].shape)
        for path, ids in also:
            with torch.no_grad():
                ref_also, new_also = ref_mod(ids, **kw), new_mod(ids, **kw)
            metrics.setdefault("also", {})[path] = {**next_token_metrics(ref_also, new_also, ids),
                                                    "tokens": int(ids.numel()), "windows": list(ids.shape)}
            del ref_also, new_also
    elif metric == "cosine":
        metrics.update(embedding_metrics(out_ref, out_new, extra["mask"], extra["n_pairs"], extra["human"]))
        metrics["sentences"] = 2 * extra["n_pairs"]
    elif isinstance(out_ref, torch.Tensor) and out_ref.is_floating_point() and out_ref.dim() >= 2 \
            and out_ref.shape[-1] > 1:
        metrics.update(next_token_metrics(out_ref, out_new, None))
    repeat = getattr(args, "repeat", 3)
    t_ref, t_new = time_forward([ref_mod, new_mod], a, kw, repeat)
    passes = []
    for p in result.report.passes:
        rewritten = [s for s in p.sites if s.get("status") == "rewritten"]
        skipped = [s for s in p.sites if s.get("status") != "rewritten"]
        passes.append({
            "pass": p.spec, "contract": p.contract, "skipped": p.skipped, "seconds": round(p.seconds, 1),
            "sites_rewritten": len(rewritten), "sites_skipped": len(skipped),
            "skip_reasons": dict(Counter(str(s.get("reason", "")) for s in skipped)),
            "max_output_error": _max_figure(rewritten, "output_error"),
            "max_weight_error": _max_figure(rewritten, "weight_error"),
            "error_vs_original": p.error_vs_original,
            "sites": [{k: _jsonable(v) for k, v in s.items()} for s in p.sites],
        })
    return {
        "command": command_line(args),
        "model": args.model, "passes": args.passes, "metric": metric, "rtn": getattr(args, "rtn", None),
        "input_shapes": [list(t.shape) for t in pytree.tree_leaves((a, kw)) if isinstance(t, torch.Tensor)],
        "metrics": metrics,
        "params": {"original": program_params(original), "rewritten": program_params(result.program)},
        "bytes": {"original": program_bytes(original), "rewritten": program_bytes(result.program)},
        "forward_s": {"original": t_ref, "rewritten": t_new, "ratio": t_new / t_ref if t_ref > 0 else None},
        "pass_results": passes,
    }


def also_windows(args, metric: str, extra: dict, dynamic: bool) -> list[tuple[str, torch.Tensor]]:
    """(path, windows) of every --also-text, read before anything runs: windows as long as the evaluation text's;
    a program exported with static shapes takes exactly as many as the evaluation text gave."""
    paths = getattr(args, "also_text", None) or []
    if not paths:
        return []
    if metric != "ppl":
        raise UserError("--also-text measures perplexity: it needs a causal LM with a tokenizer (--metric ppl)")
    tokenizer, ids = extra["resources"]["tokenizer"], extra["ids"]
    out = []
    for path in paths:
        windows = text_windows(tokenizer, _read_text(path), ids.shape[1], args.max_tokens)
        if not dynamic:
            if windows.shape[1] != ids.shape[1] or windows.shape[0] < ids.shape[0]:
                raise UserError(f"--also-text {path} gives {windows.shape[0]} windows of {windows.shape[1]} tokens; "
                                f"the programs take {ids.shape[0]} of {ids.shape[1]} (the evaluation text's): give "
                                f"a text of at least {ids.numel()} tokens, or a smaller --max-tokens")
            windows = windows[: ids.shape[0]]
        out.append((path, windows.to(ids.device)))
    return out


def parse_rtn(text: str | None) -> tuple[int, int, int] | None:
    """"4:64" -> (4, 64, 0), "4:32:6" -> (4, 32, 6); one-line UserError otherwise."""
    if not text:
        return None
    try:
        values = [int(v) for v in text.split(":")]
        if len(values) not in (2, 3):
            raise ValueError
    except ValueError:
        raise UserError(f"--rtn takes BITS:GROUP or BITS:GROUP:SCALE_BITS, e.g. 4:64 or 4:32:6; got {text!r}") from None
    bits, group, scale_bits = (values + [0])[:3]
    if not 1 <= bits <= 8 or group < 1:
        raise UserError(f"--rtn {text}: bits must be 1..8 and group >= 1")
    if scale_bits and not 2 <= scale_bits <= 8:
        raise UserError(f"--rtn {text}: scale bits must be 2..8 (or left out: fp16 scales)")
    return bits, group, scale_bits


def round_to_nearest(gm, bits: int, group: int, scale_bits: int = 0) -> int:
    """Round every linear weight but the LM head to nearest in place (the quantisation baseline); returns the
    number of layers rounded."""
    from . import bcq_fit, params
    from .matchers.linear import find_linears, is_lm_head
    count = 0
    for site in find_linears(gm):
        if is_lm_head(gm, site):
            continue
        w = site.weight_out_in(gm).detach()
        q = bcq_fit.rtn(w.float(), bits, group, scale_bits=scale_bits).to(w.dtype)
        params.set_tensor(gm, site.weight_name, q if site.layout == "out_in" else q.t().contiguous())
        count += 1
    return count


def check_disjoint(pipeline, args) -> None:
    """Refuse a pipeline whose calibration/training data file is the evaluation text (or pairs) itself."""
    evaluated = {os.path.realpath(p) for p in (_text_path(args), getattr(args, "pairs", None) or DEFAULT_PAIRS,
                                                *(getattr(args, "also_text", None) or []))}
    for p in pipeline:
        data = getattr(p, "data", "self")
        if isinstance(data, str) and data != "self" and os.path.realpath(data) in evaluated:
            raise UserError(f'pass "{p.spec()}" would calibrate on {data}, the text it is evaluated on; '
                            "give other data (or data=self)")


def _text_path(args) -> str:
    return getattr(args, "text", None) or DEFAULT_TEXT


def command_line(args) -> str:
    parts = ["rewrite", "eval", args.model]
    if args.passes:
        parts += ["--pass", f"'{args.passes}'"]
    for flag, default in (("metric", None), ("text", None), ("pairs", None), ("gguf", None), ("attn", "eager"),
                          ("max_tokens", DEFAULT_MAX_TOKENS), ("window", DEFAULT_WINDOW), ("input_shape", None),
                          ("device", None)):
        value = getattr(args, flag, default)
        if value != default:
            parts += [f"--{flag.replace('_', '-')}", str(value)]
    for path in getattr(args, "also_text", None) or []:
        parts += ["--also-text", path]
    if getattr(args, "verify", False):
        parts.append("--verify")
    if getattr(args, "rtn", None):
        parts += ["--rtn", args.rtn]
    return " ".join(parts)


def _max_figure(sites, key):
    values = [float(s[key]) for s in sites if isinstance(s.get(key), (int, float))]
    return max(values) if values else None


def _jsonable(v):
    if isinstance(v, (bool, int, str)) or v is None:
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else str(v)
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return _jsonable(v.item())
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return str(v)


# ------------------------------------------------------------------------------------------------- output
METRIC_ROWS = [  # key, label, format
    ("top1_agreement", "top-1 agreement", "{:.2%}"),
    ("top5_agreement", "top-5 agreement (orig. top-1 in new top-5)", "{:.2%}"),
    ("kl", "KL(original ‖ rewritten), nats/token", "{:.3g}"),
    ("cosine_mean", "cosine(original, rewritten) embeddings, mean", "{:.5f}"),
    ("cosine_min", "cosine(original, rewritten) embeddings, min", "{:.5f}"),
    ("spearman_pairs", "Spearman of pair similarities, original vs rewritten", "{:.4f}"),
    ("pair_sim_max_abs_change", "max |Δ pair similarity|", "{:.3g}"),
    ("output_error", "output error (max|Δ| / max|y|)", "{:.3g}"),
]


def render(results: dict, console) -> None:
    from rich.table import Table

    m = results["metrics"]
    table = Table(title=f"rewrite eval {results['model']}  --pass {results['passes'] or '(none)'}")
    table.add_column("measure")
    table.add_column("original", justify="right")
    table.add_column("rewritten", justify="right")
    table.add_column("ratio", justify="right")
    if "ppl_original" in m:
        table.add_row(f"perplexity ({m['tokens']} tokens)", f"{m['ppl_original']:.3f}", f"{m['ppl_rewritten']:.3f}",
                      f"{m['ppl_rewritten'] / m['ppl_original']:.4f}")
    for path, a in m.get("also", {}).items():
        table.add_row(f"perplexity, {os.path.basename(path)} ({a['tokens']} tokens; KL {a['kl']:.3g}, top-1 "
                      f"{a['top1_agreement']:.1%})", f"{a['ppl_original']:.3f}", f"{a['ppl_rewritten']:.3f}",
                      f"{a['ppl_rewritten'] / a['ppl_original']:.4f}")
    if "spearman_human_original" in m:
        table.add_row("Spearman vs human pair scores", f"{m['spearman_human_original']:.4f}",
                      f"{m['spearman_human_rewritten']:.4f}", "")
    p, b, t = results["params"], results["bytes"], results["forward_s"]
    table.add_row("parameters", f"{p['original']:,}", f"{p['rewritten']:,}", _ratio(p["rewritten"], p["original"]))
    table.add_row("tensor bytes", f"{b['original'] / 1e6:.2f} MB", f"{b['rewritten'] / 1e6:.2f} MB",
                  _ratio(b["rewritten"], b["original"]))
    table.add_row("forward time (median)", f"{t['original'] * 1e3:.1f} ms", f"{t['rewritten'] * 1e3:.1f} ms",
                  _ratio(t["rewritten"], t["original"]))
    for key, label, fmt in METRIC_ROWS:
        if key in m:
            table.add_row(label, "", fmt.format(m[key]), "")
    console.print(table)
    if results["pass_results"]:
        pt = Table(title="passes")
        for col in ("pass", "contract", "rewritten", "skipped", "max layer output error", "max weight error",
                    "skip reasons"):
            pt.add_column(col)
        for r in results["pass_results"]:
            reasons = r["skipped"] or "; ".join(f"{n}× {why}" for why, n in r["skip_reasons"].items())
            pt.add_row(r["pass"], r["contract"], str(r["sites_rewritten"]), str(r["sites_skipped"]),
                       _fmt(r["max_output_error"]), _fmt(r["max_weight_error"]), reasons, )
        console.print(pt)
    console.print(f"[dim]{results['command']}[/dim]", highlight=False)


def _ratio(new, old) -> str:
    return f"{new / old:.3f}" if old else ""


def _fmt(v) -> str:
    return "" if v is None else f"{v:.3g}"


def run(args, console) -> int:
    """The `rewrite eval` command. Returns the exit code (UserErrors propagate to the CLI)."""
    if args.format != "json" and getattr(args, "progress", None) is None:
        from rich.console import Console

        from .cli import _progress_factory
        args.progress = _progress_factory(Console(stderr=True))   # sampling, per-layer fits and heal take minutes
    results = evaluate(args)
    if args.format == "json":
        console.out(json.dumps(results, indent=2), highlight=False)
    else:
        render(results, console)
    return 0
