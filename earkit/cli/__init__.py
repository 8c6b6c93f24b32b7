"""The `earkit` command: a thin shell over the library, one module per command (each with
add_arguments(parser) and run(args)).

    earkit erase  --model FOLDER_OR_HUB_ID --concept church --anchor cinema --out runs/church
    earkit sample --model FOLDER_OR_HUB_ID --prompt "a church on a hill" --out samples/
    earkit erase  --model FOLDER --adapter lora --concept church --concept "van gogh" --anchor cinema --anchor painting --out runs/two
    earkit sample --model FOLDER --adapter runs/church/checkpoint --adapter runs/nudity/checkpoint --prompt "..." --out samples/
    earkit export --model BASE --checkpoint runs/church/checkpoint --out janus-no-church/   # an adapter: --merge
    earkit pairs  --concept church --backend openai --openai-url URL --openai-model MODEL --n 200 --out pairs.jsonl
    earkit filter --pairs pairs.jsonl --judge resnet50:WEIGHTS --seeds 4 --out kept.jsonl
    earkit eval   --model FOLDER --checkpoint runs/church/checkpoint --benchmark kept.jsonl --judge JUDGE --out report/
    earkit attack --model FOLDER --checkpoint runs/church/checkpoint --benchmark kept.jsonl --out attack-report/
    earkit world build --out DIR | earkit world check
    earkit bench kernels | earkit bench engine --size 7b --random-weights

Bad input (a missing model folder, a concept equal to its anchor, an empty or malformed pairs
file, a window below 1, a trainable glob that matches nothing, an output that exists) ends
with one line naming the problem and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from pathlib import Path

from earkit.cli.arguments import take_old_names

USAGE_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)

# The subcommands: name -> help; earkit.cli.NAME holds add_arguments(parser) and run(args).
COMMANDS = {
    "erase": "fine-tune a Janus model to erase a concept",
    "sample": "draw images with the CFG sampler",
    "export": "write a checkpoint as a full model folder",
    "world": "ShapesWorld, the embedded default: build, check",
    "pairs": "generate concept/anchor prompt pairs (ECGVF)",
    "filter": "keep the pairs whose images show the concept (ECGVF)",
    "eval": "measure an erasure before and after, with a report (ECGVF)",
    "attack": "attack an erasure with paraphrased and optimised prompts (ECGVF)",
    "bench": "benchmarks (python -m earkit.bench)",
}


# The commands that share their work over the ranks of a torchrun job (engine/distributed.py).
SHARDED_COMMANDS = ("sample", "filter", "eval", "erase")


def command_module(name: str):
    """earkit.cli.NAME, the module of one subcommand."""
    return importlib.import_module(f"{__name__}.{name}")


def sized_threads(args):
    """CPU threads sized to the work: one for a small model (the ShapesWorld default) on the CPU,
    where a second thread gains 20% alone and loses 3-10x on a shared machine (bench/load.py);
    torch's default otherwise, and always when the user set OMP_NUM_THREADS."""
    import contextlib
    import os

    if os.environ.get("OMP_NUM_THREADS") or args.command not in ("erase", "sample", "filter", "eval", "attack", "world"):
        return contextlib.nullcontext()
    from earkit.engine.model import cpu_threads, cpu_threads_for

    if args.command == "world":
        if args.world_command != "check":
            return contextlib.nullcontext()  # building trains at batch 64, where both threads pay
        source = Path(args.world) / "generator" if args.world else None
    else:
        source = args.model
    if source is None:
        from earkit.engine.shapesworld import generator_folder

        try:
            source = generator_folder()
        except FileNotFoundError:
            return contextlib.nullcontext()  # the command itself says so
    device = getattr(args, "device", None)
    if args.command == "world" or (args.command == "erase" and args.model is None and device is None):
        device = "cpu"  # world check and the ShapesWorld default erasure run on the CPU
    try:
        count = cpu_threads_for(source, device)
    except (RuntimeError, ValueError):
        return contextlib.nullcontext()  # a bad --device: the command names it
    return cpu_threads(count)


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as a command-line user wants it: what, not which library line said it."""
    return f"earkit: warning: {message}\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="earkit", description="Erase concepts from Janus-Pro (EAR), and measure it.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        command_module(name).add_arguments(commands.add_parser(name, help=help_text))
    return parser


def group_device(args):
    """The device that decides the process group's backend (NCCL for GPUs, gloo for CPUs)."""
    if args.command == "erase" and args.model is None and args.device is None:
        return "cpu"  # the ShapesWorld default erasure runs on the CPU
    return getattr(args, "device", None)


def joins_process_group(args) -> bool:
    """Whether this command shares its work over the ranks of a torchrun job. `erase --concepts`
    does not: each rank runs whole erasures of its own concepts, with no collective."""
    return args.command in SHARDED_COMMANDS and not getattr(args, "concepts", None)


def run_command(args, run) -> None:
    """run(args) in this process's place in a torchrun job (a lone process: as it is): the
    process group up first, each rank on its own GPU, output printed by rank 0 only."""
    import contextlib
    import io

    from earkit.engine import distributed

    launched = distributed.launch_environment()
    if launched.sharded and args.command not in SHARDED_COMMANDS:
        sharded_instead = {"attack": " (the attacks on several processes: earkit eval --attacks)"}.get(args.command, "")
        raise ValueError(f"earkit {args.command} runs in one process; launch it without torchrun "
                         f"(WORLD_SIZE={launched.world_size} here). Under torchrun: {', '.join(SHARDED_COMMANDS)}"
                         + sharded_instead)
    if not launched.sharded or not joins_process_group(args):
        run(args)
        return
    distributed.start(group_device(args))
    args.device = distributed.rank_device(group_device(args))  # each rank on its own GPU
    quiet = contextlib.nullcontext() if launched.main else contextlib.redirect_stdout(io.StringIO())
    with quiet:
        run(args)
    distributed.stop()  # not on an error: a broken group's teardown may wait on the lost rank


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    run = command_module(args.command).run
    if args.command == "bench":
        run(args)  # the benchmarks report their own errors
        return 0
    from earkit.engine.distributed import PeerLost

    library_format, warnings.formatwarning = warnings.formatwarning, one_line_warning
    try:
        take_old_names(args)  # a flag's previous spelling (--delta, ...) sets the new one, with a warning
        with sized_threads(args):
            run_command(args, run)
    except USAGE_ERRORS as error:
        print(f"earkit {args.command}: error: {error}", file=sys.stderr)
        return 2
    except PeerLost as error:  # another rank of a torchrun job died or hung: end, do not wait forever
        print(f"earkit {args.command}: error: {error}", file=sys.stderr)
        from earkit.engine import distributed

        if distributed.current().sharded:
            distributed.abandon(1)  # the broken group's teardown could hang or abort the exit
        return 1
    finally:
        warnings.formatwarning = library_format  # main() is also called in-process (tests, notebooks)
    return 0
