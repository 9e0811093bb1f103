"""The long run of the numerics properties: the property tests of the listed files with REWRITE_EXAMPLES_SCALE×
their examples (no example database), once under each ATen CPU capability (vectorised kernels differ in rounding).

    python -m bench.numerics                                    # default files, ×50, default/avx2/avx512
    python -m bench.numerics --scale 10 --capability avx2 tests/test_codegen_softmax.py

A property that held only on the examples one run happened to draw fails here; fix the code or state the bound
that was measured. Exit code: 1 when any run failed.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

FILES = ["tests/test_attention.py", "tests/test_lora.py", "tests/test_structured.py", "tests/test_shiftadd.py",
         "tests/test_vq_logits.py"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.numerics", description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="*", default=FILES)
    p.add_argument("--scale", type=float, default=50.0, help="multiply every test's max_examples by this")
    p.add_argument("--capability", action="append", choices=("default", "avx2", "avx512"),
                   help="ATEN_CPU_CAPABILITY values (default: all three)")
    args = p.parse_args(argv)
    failed = []
    for capability in args.capability or ["default", "avx2", "avx512"]:
        env = dict(os.environ, REWRITE_EXAMPLES_SCALE=str(args.scale), ATEN_CPU_CAPABILITY=capability,
                   TRITON_INTERPRET="1")
        env.pop("CI", None)
        start = time.time()
        code = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", *args.files],
                               env=env)
        print(f"ATEN_CPU_CAPABILITY={capability}: {'passed' if code == 0 else 'FAILED'} "
              f"({time.time() - start:.0f} s, ×{args.scale:g} examples)", flush=True)
        if code != 0:
            failed.append(capability)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
