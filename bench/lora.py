"""LoRA: unmerged adapter cost vs the base layer, ours vs PEFT, and merge → unmerge exactness in bf16.

    python -m bench.lora [--quick]

Speed: one linear layer (d × d) with a rank-16 adapter at several token counts; every variant timed in the same
run (interleaved rounds), reported as a ratio to the base nn.Linear:
    ours unmerged   the op a rewritten program runs for the layer (rewrite::lora_linear: base GEMM, then the
                    adapter accumulated into its output in place)
    PEFT unmerged   PEFT's LoRA layer (peft.tuners.lora.Linear) — the same layer-level comparison
and, program level, each whole program over its adapter-free twin (both pay the same call overhead): our exported
program with the adapter unmerged, and merged, ÷ the exported base program; PEFT's model ÷ the plain model.
Exactness: bf16 weights, merge then unmerge, ours vs PEFT's merge_adapter/unmerge_adapter; counts weights that did
not come back bit for bit.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

import rewriter
from bench.common import machine, markdown_table, time_side_by_side


class One(nn.Module):
    def __init__(self, d, dtype=torch.float32):
        super().__init__()
        self.proj = nn.Linear(d, d, dtype=dtype)

    def forward(self, x):
        return self.proj(x)


def _peft_model(base: nn.Module, rank: int):
    import peft
    config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"], init_lora_weights="gaussian")
    model = peft.get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model.eval()


def time_cpu(fns: dict, repeats: int = 15) -> dict:
    """Like bench.common.time_side_by_side (interleaved rounds, best of `repeats`), but counting this thread's CPU
    time: with torch on one thread all the work runs on it, and time the OS gives other jobs is not counted — on a
    machine shared with other sessions, wall-clock minima still move by tens of percent between runs."""
    with torch.inference_mode():
        for fn in fns.values():
            fn()
            fn()
        first = next(iter(fns.values()))
        t0 = time.thread_time()
        first()
        one = time.thread_time() - t0
        inner = max(1, int(2e-3 / max(one, 1e-6))) if one < 2e-3 else 1
        samples = {k: [] for k in fns}
        for _ in range(repeats):
            for k, fn in fns.items():
                t0 = time.thread_time()
                for _ in range(inner):
                    fn()
                samples[k].append((time.thread_time() - t0) / inner)
    return {k: min(v) for k, v in samples.items()}


CLOCKS = {"wall": time_side_by_side, "cpu": time_cpu}


def speed(dims, tokens_list, rank=16, repeats=15, clock="wall"):
    rows = []
    for d in dims:
        torch.manual_seed(0)
        base = One(d).eval()
        w, b = base.proj.weight.detach(), base.proj.bias.detach()
        for tokens in tokens_list:
            x = torch.randn(tokens, d)
            unmerged = rewriter.rewrite(base, (x,), f"lora{{rank={rank},init=gaussian}}")
            with torch.no_grad():
                unmerged.program.state_dict["proj.lora_B"].normal_(0, 0.02)
            sd = unmerged.program.state_dict
            a_t, b_t, scale = sd["proj.lora_A"], sd["proj.lora_B"], 2.0
            ours_program = unmerged.module()
            ours_merged = rewriter.rewrite(unmerged.program, None, "lora-merge").module()
            base_program = rewriter.rewrite(base, (x,), "").module()
            op = torch.ops.rewrite.lora_linear.default
            fns = {"base": lambda: base(x), "ours": lambda: op(x, w, b, a_t, b_t, scale),
                   "merged": lambda: ours_merged(x), "program": lambda: ours_program(x),
                   "base_program": lambda: base_program(x)}
            try:
                peft_model = _peft_model(base, rank)
                peft_layer = peft_model.base_model.model.proj
                fns["peft"] = lambda: peft_layer(x)
                fns["peft_model"] = lambda: peft_model(x)
            except ImportError:
                pass
            t = CLOCKS[clock](fns, repeats=repeats)
            peft = lambda k: t[k] / t["base"] if k in t else "peft not installed"  # noqa: E731
            rows.append([d, tokens, t["base"] * 1e3, t["ours"] / t["base"], peft("peft"),
                         t["program"] / t["base_program"], t["merged"] / t["base_program"], peft("peft_model")])
    return markdown_table(["d", "tokens", "base ms", "ours unmerged ×", "PEFT unmerged ×", "program: ours unmerged ×",
                           "program: ours merged ×", "PEFT model ×"], rows)


def exactness(d=512, rank=16):
    torch.manual_seed(0)
    base = One(d, dtype=torch.bfloat16).eval()
    x = torch.randn(4, d, dtype=torch.bfloat16)
    w0 = base.proj.weight.detach().clone()
    rows = []
    # ours
    inserted = rewriter.rewrite(base, (x,), f"lora{{rank={rank},alpha={2 * rank},init=gaussian}}")
    with torch.no_grad():
        for name, t in inserted.program.state_dict.items():
            if name.endswith("lora_B"):
                t.normal_(0, 0.02)
    back = rewriter.rewrite(inserted.program, None, "lora-merge,lora-unmerge").program.state_dict["proj.weight"]
    rows.append(["rewrite", int((back.view(torch.int16) != w0.view(torch.int16)).sum()), w0.numel(),
                 float((back.float() - w0.float()).abs().max())])
    try:
        model = _peft_model(base, rank)
        model.merge_adapter()
        model.unmerge_adapter()
        w = model.base_model.model.proj.base_layer.weight.detach()
        rows.append(["PEFT", int((w.view(torch.int16) != w0.view(torch.int16)).sum()), w0.numel(),
                     float((w.float() - w0.float()).abs().max())])
    except ImportError:
        rows.append(["PEFT", "not installed", "", ""])
    return markdown_table(["bf16 merge → unmerge", "weights changed", "of", "max |ΔW|"], rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 on a machine shared with other "
                        "jobs: there every OpenMP region waits for a descheduled thread, whatever its size)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall-clock, or this thread's CPU time (with --threads 1; robust to other jobs)")
    args = parser.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu counts one thread: use it with --threads 1")
    torch.set_num_threads(args.threads)
    print(f"# bench.lora — {machine()}, {args.clock} clock\n")
    print("## unmerged LoRA cost (time ratio to the base nn.Linear, same run)\n")
    if args.quick:
        print(speed([1024], [1, 64], repeats=5, clock=args.clock))
    else:
        print(speed([1024], [16, 512], repeats=25, clock=args.clock))
        print(speed([4096], [1, 512], repeats=15, clock=args.clock).split("\n", 2)[2])   # same columns: rows only
    print("\n## exactness\n")
    print(exactness())


if __name__ == "__main__":
    main()
