"""The `rewrite` command.

    rewrite MODEL --pass SPEC [-o OUT.pt2] [--verify] [--diff] [--time-passes] ...
    rewrite passes                  table of passes, options and contracts
    rewrite show MODEL              op counts, params, FLOPs
    rewrite diff A B                what changed between two programs
    rewrite eval MODEL --pass SPEC  accuracy of the rewrite on real inputs

Exit codes: 0 ok, 1 verification failed, 2 user error (one line on stderr; --debug shows the traceback).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from rich.console import Console

from . import distributed
from .errors import InternalError, RewriteError, UserError, first_line

SUBCOMMANDS = ("passes", "show", "diff", "eval")


def _add_source_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model input")
    g.add_argument("--trust-pickle", action="store_true",
                   help="allow loading a pickled nn.Module (.pt); unpickling runs code from the file")
    g.add_argument("--strict", action="store_true", help="export in strict mode (TorchDynamo) instead of non-strict")
    g.add_argument("--dynamic", action="store_true",
                   help="export with dynamic input dims (other batch sizes / sequence lengths run too)")
    g.add_argument("--input-shape", metavar="SHAPES",
                   help='example input shapes when the model has none, e.g. "2x16:int64" or "2x3x32x32;2x16:int64"')
    g.add_argument("--gguf", metavar="FILE", help="Hugging Face: load weights from a GGUF file")
    g.add_argument("--attn", choices=("eager", "sdpa"), default="eager",
                   help="Hugging Face: attention implementation (eager shows softmax to attention passes)")
    g.add_argument("--text", help="Hugging Face: example input text, tokenized with the model's tokenizer")
    g.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="Hugging Face / GGUF: load in this dtype (default auto: the checkpoint's own)")


def _hf_options(args) -> dict:
    options = {"attn_implementation": args.attn}
    if args.gguf:
        options["gguf"] = args.gguf
    if args.text:
        options["text"] = args.text
    if getattr(args, "dtype", "auto") != "auto":
        options["dtype"] = args.dtype
    return options


def _capture(source: str, args):
    from .capture import capture
    if getattr(args, "dtype", "auto") != "auto":
        from .hf import is_hf_source
        if not is_hf_source(source):
            raise UserError(f"--dtype applies to Hugging Face folders and GGUF files, not {source}")
    return capture(source, trust_pickle=args.trust_pickle, strict=args.strict, input_shapes=args.input_shape,
                   hf_options=_hf_options(args), dynamic=getattr(args, "dynamic", False))


def _main_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="rewrite",
        description="Rewrite a PyTorch model with verified compiler passes. "
                    f"Other commands: {', '.join('rewrite ' + s for s in SUBCOMMANDS)}.",
        epilog='example: rewrite demo:tiny-gpt --pass "lora{rank=8},lora-merge" --verify --diff -o out.pt2')
    p.add_argument("model", help="FILE.pt2 | FILE.pt (with --trust-pickle) | pkg.module:function | demo:NAME | "
                                 "Hugging Face folder")
    p.add_argument("--pass", dest="passes", required=True, metavar="SPEC",
                   help='pipeline, e.g. "lora{rank=8,alpha=16},lora-merge" (see `rewrite passes`)')
    p.add_argument("-o", "--output", metavar="OUT.pt2", help="write the rewritten program here (atomically)")
    p.add_argument("--verify", action="store_true", help="check outputs against the input program after every pass")
    p.add_argument("--force", action="store_true", help="write the output even when verification fails")
    p.add_argument("--diff", action="store_true", help="show what each pass changed")
    p.add_argument("--format", choices=("table", "json"), default="table", help="report format on stdout")
    p.add_argument("--time-passes", action="store_true", help="print how long each pass and its checks took")
    p.add_argument("--print-after", metavar="PASS", action="append", default=[],
                   help="print the graph after PASS when it changed it (repeatable; 'all' for every pass)")
    p.add_argument("--dump-dir", metavar="DIR", help="write the graph's code after every pass (NNN_pass.py)")
    p.add_argument("--save-adapter", metavar="DIR[:NAME]",
                   help="also write the program's LoRA adapter NAME (default: its only one) as a PEFT adapter folder")
    p.add_argument("--decompose", action="store_true", help="lower rewrite:: custom ops to plain aten ops")
    p.add_argument("--codegen", choices=("triton",), help="lower rewritten ops to Triton kernels")
    p.add_argument("--dump-kernels", metavar="DIR", help="with --codegen: write every kernel's source to DIR")
    p.add_argument("--jobs", type=int, metavar="N", default=None,
                   help="worker processes for per-layer work on the CPU (default: the core count; same results "
                        "for any N)")
    p.add_argument("--device", metavar="DEV", default=None,
                   help="run per-layer work (projections, fits) on this device, e.g. cuda (default: where the "
                        "weights are)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    _add_source_arguments(p)
    return p


def cmd_rewrite(argv, console: Console, err: Console) -> int:
    args = _main_parser().parse_args(argv)
    from .api import run_captured
    from .instruments import DumpDir, PrintAfter, TimePasses
    from .pass_base import parse_pipeline
    from .save import same_file

    pipeline = parse_pipeline(args.passes)  # bad specs fail before any loading
    if args.output:
        if not args.output.endswith(".pt2"):
            raise UserError(f"output {args.output} must end with .pt2")
        if os.path.exists(args.model) and same_file(args.model, args.output):
            raise UserError(f"refusing to overwrite the input {args.model}; choose another -o path")
        folder = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(folder):
            raise UserError(f"output folder {folder} does not exist")
    if args.dump_kernels and not args.codegen:
        raise UserError("--dump-kernels needs --codegen triton")
    if args.jobs is not None and args.jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {args.jobs}")
    from .parallel import check_device
    check_device(args.device)   # before loading: a missing GPU is known now
    # a pipeline that only changes tensors of a saved program (lora-swap) runs on it directly: no re-export
    from .lora_runtime import without_export
    direct = not (args.verify or args.decompose or args.codegen or args.dump_dir or args.print_after
                  or args.time_passes) and without_export(args.model, pipeline)
    captured = None if direct else _capture(args.model, args)
    instruments = []
    timer = TimePasses() if args.time_passes else None
    if timer:
        instruments.append(timer)
    if args.print_after:
        instruments.append(PrintAfter(set(args.print_after), console))
    main_rank = distributed.is_main()    # under torchrun only rank 0 prints and writes; the others run quietly
    if args.dump_dir and main_rank:
        instruments.append(DumpDir(args.dump_dir))
    progress = None if args.quiet or args.format == "json" or not main_rank else _progress_factory(err)
    from .errors import VerificationError
    try:
        result = direct() if direct else \
            run_captured(captured, pipeline, verify=args.verify, decompose=args.decompose, codegen=args.codegen,
                         instruments=instruments, progress=progress,
                         dump_kernels=args.dump_kernels if main_rank else None,
                         jobs=args.jobs, device=args.device)
        failure = None
    except VerificationError as e:
        if not args.force:
            raise
        failure = e
        result = None
    if failure is not None:
        # --force: export whatever the pipeline produced
        from .api import RewriteResult
        from .capture import export_program
        program = export_program(captured.gm, captured.args, captured.kwargs, captured.dynamic)
        result = RewriteResult(program, captured.program, None, pipeline, captured.args, captured.kwargs,
                               captured.store)
        err.print(f"[bold red]verification failed[/] ({failure}); writing anyway because of --force")
    if not main_rank:
        return 1 if failure is not None else 0
    if result.report is not None:
        if args.format == "json":
            print(json.dumps(result.report.to_json(), indent=2))
        elif args.diff:
            from .report import render_report
            render_report(result.report, console, title=f"{args.model}: {args.passes}")
        else:
            _print_brief(result.report, console)
    if timer and args.format != "json":
        timer.render(console)
    adapter = None
    if args.save_adapter:   # checked before anything is written
        from .peft_interop import adapter_payload, split_adapter_target
        folder, name = split_adapter_target(args.save_adapter)
        adapter = adapter_payload(result.program.module(), name)
    if args.output:
        from .save import save_program
        save_program(result.program, args.output, source=args.model, store=result.store)
        if args.format != "json":
            console.print(f"wrote {args.output}")
    elif args.format != "json" and not args.save_adapter:
        console.print("[dim](nothing written: give -o OUT.pt2 to save the program)[/]")
    if adapter is not None:
        from .peft_interop import write_payload
        count = write_payload(folder, adapter)
        if args.format != "json":
            console.print(f"wrote a PEFT adapter{f' ({name})' if name else ''} for {count} layers to {folder}")
    return 1 if failure is not None else 0


def _print_brief(report, console: Console) -> None:
    from .cost import format_count
    for r in report.passes:
        if r.skipped:
            console.print(f"{r.spec}: skipped ({r.skipped})")
            continue
        rewritten = sum(1 for s in r.sites if s["status"] == "rewritten")
        skipped = sum(1 for s in r.sites if s["status"] == "skipped")
        err = "" if r.error_vs_previous is None else f", error {r.error_vs_previous:.3g}"
        console.print(f"{r.spec}: {rewritten} rewritten, {skipped} skipped, params "
                      f"{format_count(r.params_before.get('params', 0))} → {format_count(r.params_after.get('params', 0))}"
                      f"{err}")


def _progress_factory(console: Console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    def progress(items, description, status=None):
        items = list(items)
        if len(items) < 2:
            return items

        def gen():
            columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
            if status is not None:
                columns.append(TextColumn("{task.fields[status]}"))
            with Progress(*columns, console=console, transient=True) as bar:
                task = bar.add_task(description, total=len(items), status="")
                for item in items:
                    yield item
                    bar.update(task, advance=1, **({"status": status()} if status is not None else {}))
        return gen()
    return progress


def cmd_passes(argv, console: Console, err: Console) -> int:
    p = argparse.ArgumentParser(prog="rewrite passes", description="List the available passes.")
    p.add_argument("--format", choices=("table", "json"), default="table")
    args = p.parse_args(argv)
    from rich.table import Table

    from .pass_base import _default, _format_value, registry
    rows = []
    for name, cls in sorted(registry().items()):
        hints = cls.option_types()
        options = [f"{cls.option_key(f.name)}={_format_value(_default(f))}" for f in cls.options()]
        rows.append({"name": name, "contract": cls.contract.value, "summary": cls.summary or
                     (cls.__doc__ or "").strip().splitlines()[0], "options": options,
                     "types": {k: getattr(v, "__name__", str(v)) for k, v in hints.items()}})
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return 0
    table = Table(title="passes", title_justify="left", show_lines=True)
    table.add_column("pass", style="bold")
    table.add_column("contract", style="cyan")
    table.add_column("what it does / options")
    for r in rows:
        table.add_row(r["name"], r["contract"], f"{r['summary']}\n[dim]{', '.join(r['options']) or 'no options'}[/]")
    console.print(table)
    return 0


def cmd_show(argv, console: Console, err: Console) -> int:
    p = argparse.ArgumentParser(prog="rewrite show", description="Summarise a model: op counts, params, FLOPs.")
    p.add_argument("model")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--debug", action="store_true")
    _add_source_arguments(p)
    args = p.parse_args(argv)
    from .diff import render_summary, summarize
    from .report import _jsonable
    summary = summarize(_capture(args.model, args))
    if args.format == "json":
        print(json.dumps(_jsonable(summary), indent=2))
    else:
        render_summary(summary, console)
    return 0


def cmd_diff(argv, console: Console, err: Console) -> int:
    p = argparse.ArgumentParser(prog="rewrite diff", description="Show what changed between two programs.")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.add_argument("--debug", action="store_true")
    _add_source_arguments(p)
    args = p.parse_args(argv)
    from .diff import diff_programs, render_diff
    from .report import _jsonable
    d = diff_programs(_capture(args.a, args), _capture(args.b, args))
    if args.format == "json":
        print(json.dumps(_jsonable(d), indent=2))
    else:
        render_diff(d, console)
    return 0


def cmd_eval(argv, console: Console, err: Console) -> int:
    try:
        from . import evaluate
    except ImportError as e:
        raise UserError(f"rewrite eval is not available ({e})") from e
    p = argparse.ArgumentParser(prog="rewrite eval", description="Evaluate a rewrite on real inputs.")
    p.add_argument("model")
    p.add_argument("--debug", action="store_true")
    evaluate.add_arguments(p)
    args = p.parse_args(argv)
    return evaluate.run(args, console)


@contextlib.contextmanager
def _quiet_transformers(quiet: bool):
    """transformers logs load reports and config warnings at warning level; the CLI prints one line per outcome
    (--debug shows them)."""
    if not quiet:
        yield
        return
    previous = os.environ.get("TRANSFORMERS_VERBOSITY")
    os.environ["TRANSFORMERS_VERBOSITY"] = "error"        # for an import that happens inside the command
    logging_ = sys.modules.get("transformers.utils.logging")
    level = logging_.get_verbosity() if logging_ is not None else None
    if logging_ is not None:
        logging_.set_verbosity_error()
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TRANSFORMERS_VERBOSITY", None)
        else:
            os.environ["TRANSFORMERS_VERBOSITY"] = previous
        logging_ = sys.modules.get("transformers.utils.logging")
        if logging_ is not None:
            logging_.set_verbosity(level if level is not None else logging_.WARNING)


COMMANDS = {"passes": cmd_passes, "show": cmd_show, "diff": cmd_diff, "eval": cmd_eval}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # under torchrun (rewriter/distributed.py) ranks other than 0 print nothing but errors
    console = Console() if distributed.is_main() else Console(file=open(os.devnull, "w"))
    err = Console(stderr=True)
    debug = "--debug" in argv
    if not debug:  # torch logs warnings (export retries, deserialisation) that would bury the one-line message
        import logging

        import torch._logging
        torch._logging.set_logs(all=logging.ERROR)
        import warnings
        warnings.filterwarnings("ignore", category=UserWarning, module="torch")
        # torch's own deprecations, raised from inside torch (e.g. pytree's LeafSpec while copying a graph)
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*(LeafSpec|TreeSpec)")
    command = COMMANDS.get(argv[0], cmd_rewrite) if argv else cmd_rewrite
    if argv and argv[0] in COMMANDS:
        argv = argv[1:]
    try:
        with _quiet_transformers(not debug):
            return command(argv, console, err)
    except RewriteError as e:
        if debug:
            raise
        label = "internal error" if isinstance(e, InternalError) else "error"
        err.print(f"[bold red]{label}:[/] {e}", highlight=False, soft_wrap=True)
        return e.exit_code
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except Exception as e:  # a bug in this tool, not the user's fault: still one line, still no traceback
        if debug:
            raise
        err.print(f"[bold red]internal error:[/] {type(e).__name__}: {first_line(e)} "
                  "(run with --debug for the traceback)",
                  highlight=False, soft_wrap=True)
        return 3
    finally:
        distributed.close()     # the process group `heal` opened under torchrun, if any


if __name__ == "__main__":
    sys.exit(main())
