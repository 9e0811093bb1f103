"""The long fuzz profile: every registered pass (and the multi-pass pipelines of tests/fuzzing.py) on N random
models each, through the Python API (and optionally the CLI and torch.compile), with verification; prints the
outcome counts per pipeline and every distinct internal error with the model that caused it.

    python -m bench.fuzz --examples 500                 # API, every pass
    python -m bench.fuzz --examples 50 --via cli --via compile --only lora --only shiftadd

Exit code 1 when any run ended in an internal error (tests/fuzzing.py defines the verdicts).
"""
from __future__ import annotations

import argparse
import collections
import sys
import time
import warnings

from hypothesis import HealthCheck, given, seed, settings


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__.splitlines()[0])
    p.add_argument("--examples", type=int, default=500, help="random models per pipeline and entry point")
    p.add_argument("--via", action="append", choices=("api", "cli", "compile", "codegen"), help="entry points (default api)")
    p.add_argument("--only", action="append", default=[], help="pipelines to run (default: all)")
    p.add_argument("--seed", type=int, default=0, help="hypothesis seed")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    from tests.fuzzing import OUTCOMES, PIPELINES, pass_specs, run_api, run_cli, run_codegen, run_compile
    from tests.random_models import model_specs
    runners = {"api": run_api, "cli": run_cli, "compile": run_compile, "codegen": run_codegen}
    pipelines = args.only or pass_specs() + PIPELINES
    counts: dict = collections.defaultdict(collections.Counter)
    failures: dict = {}
    start = time.time()
    def fuzz(via: str, pipeline: str) -> None:
        @seed(args.seed)
        @settings(max_examples=args.examples, deadline=None, database=None, derandomize=False,
                  suppress_health_check=list(HealthCheck))
        @given(model_specs())
        def run(spec):
            verdict = runners[via](spec, pipeline)
            counts[(via, pipeline)][verdict.outcome] += 1
            if not verdict.ok:
                failures.setdefault((via, pipeline, verdict.detail[:120]), spec)
        run()     # verdicts are recorded, never raised: every example runs, none is shrunk

    for via in args.via or ["api"]:
        for pipeline in pipelines:
            fuzz(via, pipeline)
            c = counts[(via, pipeline)]
            print(f"{via:8s} {pipeline:48s} " + "  ".join(f"{k} {c[k]:4d}" for k in OUTCOMES), flush=True)
    total = sum(sum(c.values()) for c in counts.values())
    internal = sum(c["internal"] for c in counts.values())
    print(f"\n{total} runs in {time.time() - start:.0f} s; {internal} internal errors")
    for (via, pipeline, detail), spec in failures.items():
        print(f"\nINTERNAL {via} {pipeline}: {detail}\n  {spec}")
    return 1 if internal else 0


if __name__ == "__main__":
    sys.exit(main())
