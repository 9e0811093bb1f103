"""`python -m bench.scale` — models the size people rewrite: wall time, peak memory, parallel speed-up.

    python -m bench.scale                                   # TinyLlama-1.1B shape, bf16, all three pipelines
    python -m bench.scale --shape small                     # a ~150M-parameter Llama shape (minutes): smoke run
    python -m bench.scale --pipelines lora --skip-layers    # one pipeline, no per-layer speed-up table
    python -m bench.scale --plan-8b                         # only the 8B-shape export / plan figures (meta device)

What it does, every figure measured in this run (one configuration at a time, never two runs side by side):
1. **Checkpoint**: a Llama-shaped model with random weights (N(0, 0.02), norms 1; seeded per tensor name)
   written as bf16 safetensors shards of ≤ 500 MB straight from the config (one shard in memory at a time), under
   $REWRITE_CACHE/bench/<shape> — built once. S = its tensor bytes.
2. **Pipelines** through the CLI in a child process, `rewrite FOLDER --pass P -o OUT.pt2 --input-shape 1x64:int64
   --jobs N`: wall time, peak resident memory of the process tree (psutil RSS, children included, sampled every
   0.1 s), the same against S, saved bytes. Pipelines: `lora{rank=16},lora-merge`, `monarch{blocks=4}`,
   `shiftadd{bits=4}` (the last on its first `--shiftadd-layers` decoder layers: BCQ at 4 bits costs ~1 min per
   2048² weight on one core here, hours for the whole model).
3. **Contract**: in fresh child processes, the un-rewritten model's logits on random token ids, then the saved
   program loaded with plain `torch.export.load` (+ `import rewriter`) on the same ids: relative error, checked
   against the bf16 exact tolerance for the exact pipeline, reported for the approximate ones.
4. **--jobs 2 vs --jobs 1**: (a) the per-layer work itself — `monarch_project` and `bcq.quantize` over the
   model's first linear weights through rewriter.parallel's executor with 1 and 2 jobs (bit-identical results
   checked), which is what `--jobs` parallelises in a pass that routes its fits through `map_layers`; (b) with
   `--jobs 1 2`, the whole CLI run of each pipeline with both (saved weights compared record by record: the CRCs
   of the archives' weight records).
5. **8B shape on meta** (`--plan-8b`, also in the full run): export time and memory of a Llama-3-8B-shaped model
   built on the meta device, and the plan of each pipeline from the captured graph's linear layers (sites,
   parameters and bytes before → after, from each pass's storage formula).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
import zlib

SHAPES = {
    "tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048),
    "small": dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                  num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=2048),
    "llama-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192),
}
PIPELINES = {"lora": "lora{rank=16},lora-merge", "monarch": "monarch{blocks=4}", "shiftadd": "shiftadd{bits=4}"}
EXACT = {"lora"}
SHARD_BYTES = 500 * 10**6
GiB = 2**30


# ---- 1. the checkpoint ---------------------------------------------------------------------------------------------
def cache_dir() -> str:
    root = os.environ.get("REWRITE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "rewrite")
    return os.path.join(root, "bench")


def llama_config(shape: str):
    import torch
    import transformers
    config = transformers.LlamaConfig(**SHAPES[shape], tie_word_embeddings=False)
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.bfloat16
    return config


def build_checkpoint(shape: str, folder: str | None = None) -> str:
    """Write the random-weight bf16 checkpoint of `shape` (once); returns its folder."""
    import torch
    import transformers
    from safetensors.torch import save_file
    folder = folder or os.path.join(cache_dir(), f"{shape}-bf16")
    if os.path.isfile(os.path.join(folder, "model.safetensors.index.json")):
        return folder
    config = llama_config(shape)
    with torch.device("meta"):
        names = [(n, tuple(t.shape)) for n, t in transformers.LlamaForCausalLM(config).state_dict().items()]
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".build-", dir=os.path.dirname(folder))
    shards: list[list[str]] = [[]]
    sizes = [0]
    for name, shp in names:
        n = 2
        for s in shp:
            n *= s
        if sizes[-1] and sizes[-1] + n > SHARD_BYTES:
            shards.append([])
            sizes.append(0)
        shards[-1].append(name)
        sizes[-1] += n
    shapes = dict(names)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in shard:
            gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            if len(shapes[name]) == 1:
                t = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                t = (torch.randn(shapes[name], generator=gen) * 0.02).to(torch.bfloat16)
            tensors[name] = t
            weight_map[name] = file
            total += t.numel() * 2
        save_file(tensors, os.path.join(tmp, file), metadata={"format": "pt"})
        del tensors
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    config.save_pretrained(tmp)
    os.rename(tmp, folder)
    return folder


# ---- memory sampling -------------------------------------------------------------------------------------------
def run_sampled(cmd: list[str], env: dict | None = None, interval: float = 0.1) -> dict:
    """Run cmd; peak RSS of its process tree (children included), wall time, exit code, output."""
    import psutil
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    root = psutil.Process(proc.pid)
    peak = {"rss": 0, "main": 0, "children": 0}

    def sample():
        while proc.poll() is None:
            try:
                tree = [root] + root.children(recursive=True)
                sizes = []
                for p in tree:
                    try:
                        sizes.append(p.memory_info().rss)
                    except psutil.Error:
                        sizes.append(0)
                peak["rss"] = max(peak["rss"], sum(sizes))
                peak["main"] = max(peak["main"], sizes[0])
                peak["children"] = max(peak["children"], sum(sizes[1:]))
            except psutil.Error:
                pass
            time.sleep(interval)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, err = proc.communicate()
    thread.join()
    return {"rc": proc.returncode, "wall_s": time.perf_counter() - start, "peak_rss": peak["rss"],
            "peak_main_rss": peak["main"], "peak_children_rss": peak["children"], "stdout": out, "stderr": err}


def rewrite_cmd() -> list[str]:
    return [sys.executable, "-m", "rewriter.cli"]


def weight_crcs(path: str) -> dict:
    """{record name: (crc32, size)} of the saved archive's weight records (what --jobs must not change)."""
    with zipfile.ZipFile(path) as z:     # records are "<archive root>/data/weights/weight_<i>"
        return {i.filename.split("/", 1)[-1]: (i.CRC, i.file_size) for i in z.infolist()
                if "/weights/" in i.filename}


# ---- 2. the pipelines ------------------------------------------------------------------------------------------
def run_pipeline(folder: str, name: str, jobs: int, out: str, shiftadd_layers: int) -> dict:
    spec = PIPELINES[name]
    if name == "shiftadd" and shiftadd_layers:
        layers = "|".join(str(i) for i in range(shiftadd_layers))
        spec = f"shiftadd{{bits=4,targets='layers\\.({layers})\\.'}}"
    cmd = rewrite_cmd() + [folder, "--pass", spec, "-o", out, "--input-shape", "1x64:int64", "-q",
                           "--jobs", str(jobs), "--format", "json"]
    r = run_sampled(cmd)
    row = {"pipeline": spec, "jobs": jobs, "rc": r["rc"], "wall_s": r["wall_s"], "peak_rss": r["peak_rss"],
           "peak_main_rss": r["peak_main_rss"], "peak_children_rss": r["peak_children_rss"]}
    if r["rc"] != 0:
        row["error"] = r["stderr"].strip().splitlines()[-1:] or ["?"]
        return row
    report = json.loads(r["stdout"])
    row["pass_s"] = sum(p["seconds"] for p in report["passes"])
    row["sites"] = sum(1 for p in report["passes"] for s in p["sites"] if s["status"] == "rewritten")
    row["saved_bytes"] = os.path.getsize(out)
    row["weights"] = weight_crcs(out)
    return row


# ---- 3. contract check (children) -------------------------------------------------------------------------------
def child_reference(folder: str, out_file: str) -> None:
    """Child: the un-rewritten model's logits on seeded random ids, saved for the check."""
    import torch
    from rewriter import hf, lazy_weights
    model, _, kwargs = hf.load_hf(folder)
    ids = torch.randint(0, model.model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids, **kwargs)
    torch.save({"ids": ids, "logits": logits}, out_file)
    store = lazy_weights.store_for(model)
    print(json.dumps({"rss": lazy_weights.resident_bytes(), "releases": store is not None}))


def child_check(program_file: str, reference_file: str) -> None:
    """Child: the saved program through plain torch.export.load, against the reference logits."""
    import torch
    import rewriter  # noqa: F401  (registers the rewrite:: ops)
    from rewriter.verify import relative_error
    ref = torch.load(reference_file)
    program = torch.export.load(program_file)
    with torch.no_grad():
        got = program.module()(ref["ids"], use_cache=False)
    print(json.dumps({"model_error": relative_error([ref["logits"]], [got]), "dtype": str(got.dtype)}))


def check_contract(folder: str, program_file: str, reference_file: str) -> dict:
    if not os.path.exists(reference_file):
        r = run_sampled([sys.executable, "-m", "bench.scale", "--child-reference", folder, reference_file])
        if r["rc"]:
            return {"check": "reference failed: " + r["stderr"].strip().splitlines()[-1]}
    r = run_sampled([sys.executable, "-m", "bench.scale", "--child-check", program_file, reference_file])
    if r["rc"]:
        return {"check": "load failed: " + r["stderr"].strip().splitlines()[-1], "check_peak_rss": r["peak_rss"]}
    return {**json.loads(r["stdout"].strip().splitlines()[-1]), "check_peak_rss": r["peak_rss"]}


# ---- 4b. per-layer work through the executor ---------------------------------------------------------------------
def layer_items(folder: str, what: str, limit: int | None):
    from rewriter import hf
    model, _, _ = hf.load_hf(folder)
    import torch
    weights = [(n, m.weight) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and "lm_head" not in n]
    if limit:
        weights = weights[:limit]
    if what == "monarch":
        return model, [(w.detach(), 4) for _, w in weights]
    return model, [(w.detach(), 4, 128, 1, 1) for _, w in weights]


def child_layers(folder: str, what: str, jobs: int, limit: int) -> None:
    """Child: `what`'s per-layer function over the model's linears through the executor with `jobs`."""
    from rewriter import bcq, parallel
    from rewriter.projections import monarch_project
    model, items = layer_items(folder, what, limit or None)
    fn = monarch_project if what == "monarch" else _bcq_float
    start = time.perf_counter()
    with parallel.session(jobs=jobs) as executor:
        results = executor.map(fn, items)
    seconds = time.perf_counter() - start
    digest = hashlib.sha256()
    for r in results:
        for t in parallel._tensors(r):
            digest.update(t.contiguous().reshape(-1).view(__import__("torch").uint8).numpy().tobytes())
    del bcq
    print(json.dumps({"seconds": seconds, "layers": len(items), "digest": digest.hexdigest(),
                      "pool_items": executor.stats["pool_items"]}))


def _bcq_float(w, bits, group, rounds, terms):
    """bcq.quantize on the fp32 copy of a weight (the shiftadd pass's per-layer fit)."""
    from rewriter import bcq
    return bcq.quantize(w.float(), bits, group, rounds, terms)


def run_layers(folder: str, what: str, jobs: int, limit: int) -> dict:
    r = run_sampled([sys.executable, "-m", "bench.scale", "--child-layers", folder, what, str(jobs), str(limit)])
    if r["rc"]:
        return {"error": r["stderr"].strip().splitlines()[-1:]}
    return {**json.loads(r["stdout"].strip().splitlines()[-1]), "wall_s": r["wall_s"], "peak_rss": r["peak_rss"]}


# ---- 5. the 8B shape on meta ----------------------------------------------------------------------------------------
def plan_8b() -> dict:
    """Export time of the 8B shape on the meta device and the plan of each pipeline from its linear layers."""
    import psutil
    import torch
    import transformers
    from rewriter.capture import export_model
    from rewriter.hf import HFOutput
    from rewriter.matchers.linear import find_linears, is_lm_head
    config = llama_config("llama-8b")
    config._attn_implementation = "eager"
    start = time.perf_counter()
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    built = time.perf_counter() - start
    wrapped = HFOutput(model, causal=True).eval()
    start = time.perf_counter()
    ep = export_model(wrapped, (torch.zeros(1, 64, dtype=torch.long),), {"use_cache": False})
    exported = time.perf_counter() - start
    rss = psutil.Process().memory_info().rss
    gm = ep.module()
    params = sum(p.numel() for p in gm.parameters())
    sites = [s for s in find_linears(gm) if not is_lm_head(gm, s)]
    dense = sum(s.in_features * s.out_features for s in sites)
    plan = {}
    # lora rank 16 + merge: A, B kept (bf16) + an int8 correction per merged weight element
    extra = sum(16 * (s.in_features + s.out_features) for s in sites)
    plan["lora"] = {"sites": len(sites), "params": params, "bytes": 2 * params + 2 * extra + dense}
    # monarch{blocks=4}: q·(b·p + b·s) parameters per layer (p = n/b, s = m/b, q = min(p, s))
    monarch = 0
    for s in sites:
        p, q_out = -(-s.in_features // 4), -(-s.out_features // 4)
        q = min(p, q_out)
        monarch += q * (4 * p + 4 * q_out)
    plan["monarch"] = {"sites": len(sites), "params": params - dense + monarch,
                       "bytes": 2 * (params - dense + monarch)}
    # shiftadd{bits=4}: bits + 8·bits·terms/group bits per weight (4.25 at group 128)
    plan["shiftadd"] = {"sites": len(sites), "params": params,
                        "bytes": int(2 * (params - dense) + dense * (4 + 8 * 4 / 128) / 8)}
    return {"build_s": built, "export_s": exported, "export_rss": rss, "params": params,
            "checkpoint_bytes": 2 * params, "linear_sites": len(sites), "nodes": len(gm.graph.nodes),
            "plan": plan}


# ---- report --------------------------------------------------------------------------------------------------------
def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama-1.1b")
    p.add_argument("--pipelines", nargs="*", choices=sorted(PIPELINES), default=["lora", "monarch", "shiftadd"])
    p.add_argument("--jobs", nargs="*", type=int, default=[2],
                   help="worker counts for the CLI runs (e.g. --jobs 1 2: each pipeline with both, results compared)")
    p.add_argument("--layer-jobs", nargs="*", type=int, default=[1, 2],
                   help="worker counts for the per-layer executor table")
    p.add_argument("--shiftadd-layers", type=int, default=2, help="decoder layers shiftadd rewrites (0 = all)")
    p.add_argument("--layer-limit", type=int, default=14,
                   help="linears in the per-layer speed-up table for monarch (shiftadd: at most 4; 0 = all)")
    p.add_argument("--skip-layers", action="store_true", help="no per-layer executor table")
    p.add_argument("--skip-8b", action="store_true")
    p.add_argument("--plan-8b", action="store_true", help="only the 8B meta figures")
    p.add_argument("--json", metavar="FILE", help="also write the results here")
    p.add_argument("--child-reference", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--child-check", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--child-layers", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_reference:
        child_reference(*args.child_reference)
        return 0
    if args.child_check:
        child_check(*args.child_check)
        return 0
    if args.child_layers:
        folder, what, jobs, limit = args.child_layers
        child_layers(folder, what, int(jobs), int(limit))
        return 0
    import torch
    machine = (f"{platform.node() or 'host'}: {os.cpu_count()} cores, torch {torch.__version__}, "
               f"load average {os.getloadavg()[0]:.1f} at start")
    results: dict = {"machine": machine, "shape": args.shape}
    print(f"# bench.scale — {machine}", flush=True)
    if args.plan_8b or not args.skip_8b:
        plan = plan_8b()
        results["8b"] = plan
        print(f"8B shape on meta: {plan['params'] / 1e9:.2f}B params ({gib(plan['checkpoint_bytes'])} in bf16), "
              f"built in {plan['build_s']:.1f} s, exported in {plan['export_s']:.1f} s at {gib(plan['export_rss'])} "
              f"RSS, {plan['linear_sites']} linear layers", flush=True)
        for name, row in plan["plan"].items():
            print(f"  plan {PIPELINES[name]}: {row['sites']} sites, output ≈ {gib(row['bytes'])} "
                  f"({row['bytes'] / plan['checkpoint_bytes']:.2f} × S)", flush=True)
        if args.plan_8b:
            return _write(results, args.json)
    start = time.perf_counter()
    folder = build_checkpoint(args.shape)
    from rewriter.hf import checkpoint_bytes
    size = checkpoint_bytes(folder)
    results["checkpoint"] = {"folder": folder, "bytes": size, "build_s": time.perf_counter() - start}
    print(f"checkpoint {folder}: {gib(size)}", flush=True)
    work = tempfile.mkdtemp(prefix="bench-scale-", dir=os.path.dirname(folder))
    reference = os.path.join(work, "reference.pt")
    rows = []
    try:
        for name in args.pipelines:
            for jobs in args.jobs:
                out = os.path.join(work, f"{name}-j{jobs}.pt2")
                row = run_pipeline(folder, name, jobs, out, args.shiftadd_layers)
                row["name"] = name
                if row["rc"] == 0 and jobs == args.jobs[0]:
                    row.update(check_contract(folder, out, reference))
                    if name in EXACT and "model_error" in row:
                        from rewriter.verify import EXACT_TOLERANCE
                        row["tolerance"] = EXACT_TOLERANCE[torch.bfloat16]
                        row["within_contract"] = row["model_error"] <= row["tolerance"]
                rows.append(row)
                print(_row_text(row, size), flush=True)
            done = [r for r in rows if r["name"] == name and r["rc"] == 0]
            if len(done) > 1:
                same = all(r["weights"] == done[0]["weights"] for r in done[1:])
                print(f"  {name}: saved weights identical for jobs {args.jobs}: {same}", flush=True)
                for r in done:
                    r["identical_across_jobs"] = same
            for r in rows:
                if r["name"] == name and r["rc"] == 0:
                    os.unlink(os.path.join(work, f"{name}-j{r['jobs']}.pt2"))
        results["pipelines"] = [{k: v for k, v in r.items() if k != "weights"} for r in rows]
        if not args.skip_layers:
            layers = {}
            for what in ("monarch", "shiftadd"):
                runs = {jobs: run_layers(folder, what, jobs, args.layer_limit if what == "monarch" else
                                         min(args.layer_limit or 4, 4)) for jobs in args.layer_jobs}
                layers[what] = runs
                base = runs[args.layer_jobs[0]]
                for jobs, r in runs.items():
                    if "error" in r:
                        print(f"  per-layer {what} jobs={jobs}: {r['error']}", flush=True)
                        continue
                    print(f"  per-layer {what}: {r['layers']} linears, jobs={jobs}: {r['seconds']:.1f} s "
                          f"(× {base.get('seconds', 0) / r['seconds']:.2f}), peak {gib(r['peak_rss'])}, "
                          f"digest {'same' if r['digest'] == base.get('digest') else 'DIFFERENT'}", flush=True)
            results["layers"] = layers
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _write(results, args.json)


def _row_text(row: dict, size: int) -> str:
    if row["rc"] != 0:
        return f"  {row['pipeline']} --jobs {row['jobs']}: exit {row['rc']} {row.get('error')}"
    text = (f"  {row['pipeline']} --jobs {row['jobs']}: {row['wall_s']:.0f} s (passes {row['pass_s']:.0f} s), "
            f"peak {gib(row['peak_rss'])} = {row['peak_rss'] / size:.2f} × S (main process {gib(row['peak_main_rss'])}, "
            f"workers {gib(row['peak_children_rss'])}, each at its own peak), saved {gib(row['saved_bytes'])} "
            f"= {row['saved_bytes'] / size:.2f} × S, {row['sites']} sites")
    if "model_error" in row:
        text += (f"; torch.export.load: error {row['model_error']:.3g} vs the model ({row['dtype']}"
                 + (f", exact tolerance {row['tolerance']:g}: {'ok' if row['within_contract'] else 'FAILED'})"
                    if "tolerance" in row else ", approximate: reported)"))
    elif "check" in row:
        text += f"; {row['check']}"
    return text


def _write(results: dict, path: str | None) -> int:
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
