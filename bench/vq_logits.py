"""VQ-logits: logits time (dense head vs codebook + gather) and accuracy on the demo LM — side by side in one run.

    .venv/bin/python -m bench.vq_logits            # V ∈ {32000, 128000}, d ∈ {512, 2048}, K ∈ {256, 1024, 4096},
                                                   # rows (batch·tokens) ∈ {1, 512}
    .venv/bin/python -m bench.vq_logits --quick    # V = 32000, d = 512, K ∈ {256, 1024}, rows ∈ {1, 512}
    .venv/bin/python -m bench.vq_logits --json     # figures as JSON only
    .venv/bin/python -m bench.vq_logits --program  # only the saved-program table (below)

Table 1: median time of `h·Wᵀ` (dense fp32) vs `rewrite::vq_logits(h, C, M)` (h·Cᵀ then a gather to V), and of
`log_softmax(h·Wᵀ)` vs the fused `vq_logits(..., log_softmax=True)` (normaliser over K codes with log|cluster|).
Goal: ≥ 6× at K = 1024, V = 32,000. Codebook and map are random (time does not depend on their values).

Saved-program table (`program_table`): the path users run — an LM tail (token embedding, then the head: the
dense tied head, or rewrite::vq_logits with the embedding kept) exported, saved, loaded with
torch.export.load(...).module() and called on token ids — against the dense tail as an eager module, next to the
op alone, and "write": allocating and filling a fresh (rows, V) output, the bound any head that writes V logits
per row meets (its speed-up over dense is the write-bound limit). Goals (V 32,000, d 512, K 1,024): ≥ 10× at
1 token (decode), ≥ 80 % of the write-bound limit at 512 tokens (prefill).

Table 2 (demo:tiny-gpt: tied head, vocab 256, d = 64): per K, head parameters before/after, top-1 agreement and
top-5 overlap with the original logits, and perplexity on a fixed synthetic sequence — 4 × 64 tokens sampled
from the original model itself (seed 0, temperature 1), so the original model's perplexity is meaningful; the
rewritten model is scored on the same tokens.
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch

import rewriter  # noqa: F401  (registers the custom ops)
from bench.common import time_side_by_side

OP = torch.ops.rewrite.vq_logits.default


def speed_table(vocabs, dims, codes, rows_list, repeats) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for vocab, dim in itertools.product(vocabs, dims):
        w = torch.randn(vocab, dim, generator=g) / dim ** 0.5
        for rows in rows_list:
            h = torch.randn(rows, dim, generator=g)
            with torch.no_grad():
                for k in codes:
                    c = torch.randn(k, dim, generator=g) / dim ** 0.5
                    m = torch.randint(0, k, (vocab,), generator=g, dtype=torch.int32)
                    times = time_side_by_side({
                        "dense": lambda: h @ w.t(),
                        "dense_ls": lambda: torch.log_softmax(h @ w.t(), -1),
                        "vq": lambda: OP(h, c, m),
                        "vq_ls": lambda: OP(h, c, m, None, True)}, repeats)
                    t_dense, t_dense_ls, t_vq, t_vq_ls = (times[k_] for k_ in ("dense", "dense_ls", "vq", "vq_ls"))
                    out.append({"V": vocab, "d": dim, "K": k, "rows": rows, "dense_ms": 1e3 * t_dense,
                                "vq_ms": 1e3 * t_vq, "speedup": t_dense / t_vq,
                                "dense_log_softmax_ms": 1e3 * t_dense_ls, "vq_log_softmax_ms": 1e3 * t_vq_ls,
                                "log_softmax_speedup": t_dense_ls / t_vq_ls,
                                "head_params_cut": 1 - (k * dim + vocab) / (vocab * dim)})
    return out


class _Tail(torch.nn.Module):
    """Embedding then the head: dense and tied to the embedding, or rewrite::vq_logits (codebook + map)."""

    def __init__(self, vocab, dim, codes, gen, vq: bool):
        super().__init__()
        self.emb = torch.nn.Parameter(torch.randn(vocab, dim, generator=gen) / dim ** 0.5, requires_grad=False)
        self.vq = vq
        if vq:
            self.codebook = torch.nn.Parameter(torch.randn(codes, dim, generator=gen) / dim ** 0.5,
                                               requires_grad=False)
            self.register_buffer("code_map", torch.randint(0, codes, (vocab,), generator=gen, dtype=torch.int32))

    def forward(self, idx):
        h = torch.nn.functional.embedding(idx, self.emb)
        if self.vq:
            return OP(h, self.codebook, self.code_map)
        return torch.nn.functional.linear(h, self.emb)


def _saved(module, idx):
    import os
    import tempfile
    program = torch.export.export(module, (idx,))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tail.pt2")
        torch.export.save(program, path)
        return torch.export.load(path).module()


def program_table(vocab, dim, codes, rows_list, repeats) -> list[dict]:
    """Per row count (1 token = decode; 512 = prefill): dense tail (eager) vs the VQ tail as a saved program, the
    op alone, and writing a fresh output of the logits' size."""
    g = torch.Generator().manual_seed(4)
    dense, vq = _Tail(vocab, dim, codes, g, False).eval(), _Tail(vocab, dim, codes, g, True).eval()
    out = []
    for rows in rows_list:
        idx = torch.randint(0, vocab, (1, rows), generator=g)
        program = _saved(vq, idx)
        h = torch.nn.functional.embedding(idx, vq.emb).detach()
        times = time_side_by_side({
            "dense": lambda: dense(idx), "program": lambda: program(idx),
            "op": lambda: OP(h, vq.codebook, vq.code_map),
            "write": lambda: torch.empty(1, rows, vocab).fill_(1.0)}, repeats)
        limit = times["dense"] / times["write"]
        out.append({"V": vocab, "d": dim, "K": codes, "rows": rows, "dense_ms": 1e3 * times["dense"],
                    "program_ms": 1e3 * times["program"], "op_ms": 1e3 * times["op"],
                    "write_ms": 1e3 * times["write"], "program_speedup": times["dense"] / times["program"],
                    "op_speedup": times["dense"] / times["op"], "write_bound_speedup": limit,
                    "program_of_write_bound": times["dense"] / times["program"] / limit})
    return out


def _sample(model, batch: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (batch, 1), generator=g)
    with torch.no_grad():
        while ids.shape[1] < length:
            probs = torch.softmax(model(ids)[:, -1].double(), -1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], 1)
    return ids


def accuracy_table(codes, iters: int) -> list[dict]:
    from passes.vq_logits import agreement, perplexity
    from rewriter import rewrite
    from rewriter.demo_models import demo_model
    model, args = demo_model("tiny-gpt")
    seq = _sample(model, 4, 64, seed=0)
    with torch.no_grad():
        ref = model(seq)
    rows = []
    for k in codes:
        r = rewrite(model, (seq,), passes=f"vq-logits{{codes={k},iters={iters},seed=0}}")
        site = r.report.passes[0].sites[0]
        with torch.no_grad():
            got = r.module()(seq)
        rows.append({"K": k, "head_params_before": site["head_params_before"],
                     "head_params_after": site["head_params_after"], "head_params_cut": site["head_params_cut"],
                     **agreement(ref, got), "perplexity_before": perplexity(ref, seq),
                     "perplexity_after": perplexity(got, seq)})
        rows[-1]["perplexity_change"] = rows[-1]["perplexity_after"] / rows[-1]["perplexity_before"] - 1
    return rows


def _markdown(rows, cols) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    return "\n".join(["| " + " | ".join(c[1] for c in cols) + " |", "|" + "|".join("---" for _ in cols) + "|",
                      *["| " + " | ".join(fmt(r[c[0]]) for c in cols) + " |" for r in rows]])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--program", action="store_true", help="only the saved-program table")
    ns = ap.parse_args(argv)
    if ns.program:
        rows = program_table(32000, 512, 1024, [1, 512], repeats=5 if ns.quick else 9)
        if ns.json:
            print(json.dumps({"threads": torch.get_num_threads(), "program": rows}, indent=1))
            return
        print(f"## vq-logits through a saved program (CPU, {torch.get_num_threads()} threads, fp32, best of "
              f"interleaved rounds; speed-ups over the dense tail)\n")
        print(_markdown(rows, [("rows", "rows"), ("dense_ms", "dense ms"), ("program_ms", "program ms"),
                               ("op_ms", "op ms"), ("write_ms", "write ms"), ("program_speedup", "program"),
                               ("op_speedup", "op alone"), ("write_bound_speedup", "write-bound limit"),
                               ("program_of_write_bound", "program / limit")]))
        print("\n" + json.dumps(rows))
        return
    if ns.quick:
        speed = speed_table([32000], [512], [256, 1024], [1, 512], repeats=5)
    else:
        speed = speed_table([32000, 128000], [512, 2048], [256, 1024, 4096], [1, 512], repeats=5)
    acc = accuracy_table([16, 32, 64, 128, 192], iters=10)
    result = {"device": "cpu", "threads": torch.get_num_threads(), "speed": speed, "accuracy": acc}
    if ns.json:
        print(json.dumps(result, indent=1))
        return
    print(f"## vq-logits: logits time (CPU, {torch.get_num_threads()} threads, fp32, best of interleaved rounds)\n")
    print(_markdown(speed, [("V", "V"), ("d", "d"), ("K", "K"), ("rows", "rows"), ("dense_ms", "dense ms"),
                            ("vq_ms", "vq ms"), ("speedup", "speed-up"),
                            ("dense_log_softmax_ms", "dense+log_softmax ms"),
                            ("vq_log_softmax_ms", "vq fused log_softmax ms"),
                            ("log_softmax_speedup", "speed-up"), ("head_params_cut", "head params cut")]))
    print("\n## vq-logits on demo:tiny-gpt (tied head, V = 256, d = 64; 4×64 tokens sampled from the model)\n")
    print(_markdown(acc, [("K", "K"), ("head_params_before", "head params before"),
                          ("head_params_after", "after"), ("top1_agreement", "top-1 agree"),
                          ("top5_overlap", "top-5 overlap"), ("perplexity_before", "ppl before"),
                          ("perplexity_after", "ppl after"), ("perplexity_change", "ppl change")]))
    print("\n" + json.dumps(result))


if __name__ == "__main__":
    main()
