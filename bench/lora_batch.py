"""Mixed-adapter batches: one program call with a per-row adapter index vs PEFT looping over the adapters.

    python -m bench.lora_batch [--quick]

One d × d linear layer with 8 rank-16 adapters (loaded into our program from PEFT's own folders, so both run the
same weights — checked), a batch of 8·n rows where row i uses adapter i mod 8 (interleaved, as requests arrive),
n = 1 and 64 rows per adapter. Timed side by side in one run (interleaved rounds, best of N):
    ours (op)          rewrite::multi_lora_linear with the row index: one base GEMM over the whole batch, then per
                       adapter its rows' two rank-r GEMMs accumulated in place (the CPU path; on a GPU the same op
                       lowers to one Triton kernel, codegen/templates/lora_batch.py)
    ours (program)     the exported program (lora-batch) called once, index set in its buffer
    PEFT loop          per adapter: set_adapter, forward its sub-batch (index_select in, index_copy out) — 8 calls
    PEFT adapter_names PEFT's own mixed-batch forward (model(x, adapter_names=[...]))
and the speed-up of ours over the PEFT loop (the issue's ratio), plus the base linear alone for scale.
"""
from __future__ import annotations

import argparse
import copy
import os
import tempfile

import torch
from torch import nn

import rewriter
from bench.common import machine, markdown_table
from bench.lora import CLOCKS
from rewriter.lora_runtime import set_adapter_index

ADAPTERS = 8


class One(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        return self.proj(x)


def _peft_with_adapters(base: nn.Module, rank: int, count: int):
    import peft
    model = None
    for k in range(count):
        config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["proj"], init_lora_weights="gaussian")
        if model is None:
            model = peft.get_peft_model(copy.deepcopy(base), config, adapter_name=f"t{k}")
        else:
            model.add_adapter(f"t{k}", config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model.eval()


def run(dims=(1024,), rows_per_adapter=(1, 64), rank=16, repeats=15, clock="wall"):
    rows = []
    for d in dims:
        torch.manual_seed(0)
        base = One(d).eval()
        model = _peft_with_adapters(base, rank, ADAPTERS)
        names = [f"t{k}" for k in range(ADAPTERS)]
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            folders = {n: os.path.join(tmp, n) if os.path.isdir(os.path.join(tmp, n)) else tmp for n in names}
            for n in rows_per_adapter:
                x = torch.randn(ADAPTERS * n, d)
                spec = ",".join(f"lora{{adapter='{folders[k]}',name={k}}}" for k in names) + ",lora-batch"
                result = rewriter.rewrite(base, (x,), spec)
                program = result.module()
                assign = [names[i % ADAPTERS] for i in range(x.shape[0])]
                set_adapter_index(result.program, assign)
                node = next(n_ for n_ in program.graph.nodes if "multi_lora_linear" in str(n_.target))
                op_args = [getattr(a, "target", a) for a in node.args]
                sd = dict(program.named_parameters()) | dict(program.named_buffers())
                get = lambda a: sd[a] if isinstance(a, str) and a in sd else a  # noqa: E731
                args = [get(a) if not isinstance(a, list) else [get(getattr(t, "target", t)) for t in a]
                        for a in op_args]
                args[0] = x
                op = torch.ops.rewrite.multi_lora_linear.default
                groups = [torch.tensor([i for i in range(x.shape[0]) if assign[i] == k]) for k in names]

                def peft_loop():
                    out = torch.empty(x.shape[0], d)
                    for k, rows_k in zip(names, groups):
                        model.set_adapter(k)
                        out.index_copy_(0, rows_k, model(x.index_select(0, rows_k)))
                    return out

                with torch.no_grad():      # the same function, both ways
                    want = peft_loop()
                    torch.testing.assert_close(program(x), want, rtol=1e-4, atol=1e-4)
                    torch.testing.assert_close(op(*args), want, rtol=1e-4, atol=1e-4)
                    torch.testing.assert_close(model(x, adapter_names=assign), want, rtol=1e-4, atol=1e-4)
                t = CLOCKS[clock]({"base": lambda: base(x), "op": lambda: op(*args), "program": lambda: program(x),
                                   "loop": peft_loop, "names": lambda: model(x, adapter_names=assign)}, repeats=repeats)
                rows.append([d, n, x.shape[0], t["base"] * 1e3, t["op"] * 1e3, t["program"] * 1e3, t["loop"] * 1e3,
                             t["names"] * 1e3, t["loop"] / t["op"], t["loop"] / t["program"]])
    return markdown_table(["d", "rows/adapter", "batch", "base linear ms", "ours op ms", "ours program ms",
                           "PEFT loop ms", "PEFT adapter_names ms", "PEFT loop ÷ ours (op)",
                           "PEFT loop ÷ ours (program)"], rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (see bench.lora)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="see bench.lora")
    args = parser.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu counts one thread: use it with --threads 1")
    torch.set_num_threads(args.threads)
    print(f"# bench.lora_batch — {machine()}, {args.clock} clock, {ADAPTERS} adapters of rank 16\n")
    print(run(dims=(256,) if args.quick else (1024,), repeats=5 if args.quick else 15, clock=args.clock))


if __name__ == "__main__":
    main()
