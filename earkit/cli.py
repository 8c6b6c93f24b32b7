"""The `earkit` command: a thin shell over the library.

    earkit erase  --model FOLDER_OR_HUB_ID --concept church --anchor cinema --out runs/church
    earkit sample --model FOLDER_OR_HUB_ID --prompt "a church on a hill" --out samples/
    earkit export --model BASE --checkpoint runs/church/checkpoint --out janus-no-church/
    earkit pairs  --concept church --backend template --backend openai:URL:MODEL --n 200 --out pairs.jsonl
    earkit filter --pairs pairs.jsonl --judge resnet50:WEIGHTS --seeds 4 --out kept.jsonl
    earkit eval   --model FOLDER --delta runs/church/checkpoint --benchmark kept.jsonl --judge JUDGE --out report/
    earkit world build --out DIR | earkit world check
    earkit bench kernels | earkit bench engine --size 7b --random-weights

Bad input (a missing model folder, a concept equal to its anchor, an empty or malformed pairs
file, a window below 1, a trainable glob that matches nothing, an output that exists) ends
with one line naming the problem and exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from pathlib import Path

USAGE_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)


def _optional_float(text: str):
    return None if text.lower() == "none" else float(text)


def add_erase_arguments(parser: argparse.ArgumentParser) -> None:
    """Every training flag defaults to None (not given), so that each path knows what the user
    asked for: EraseConfig's defaults with --model, ShapesWorld's own without it, the
    checkpoint's with --resume. The help states the defaults."""
    from earkit.engine.shapesworld import SHAPESWORLD_ERASE
    from earkit.engine.trainer import DEFAULT_TRAINABLE, OPTIMIZERS, WGA_MODES, EraseConfig
    from earkit.engine.objectives import OBJECTIVES

    defaults = EraseConfig(model="")

    def default(name: str) -> str:
        value = getattr(defaults, name)
        text = f"default: {value}"
        if name in SHAPESWORLD_ERASE:
            text += f"; {SHAPESWORLD_ERASE[name]} for the ShapesWorld default"
        return text + "; with --resume, the checkpoint's"

    parser.add_argument("--model", default=None,
                        help="Janus model folder or hub id (e.g. deepseek-community/Janus-Pro-1B); default: the "
                             "shipped ShapesWorld, erasing circle (-> square), evaluated before and after")
    parser.add_argument("--out", default=defaults.out, help="output folder: checkpoint/ and metrics.json (default: %(default)s)")
    parser.add_argument("--concept", help="the concept to erase, e.g. church")
    parser.add_argument("--anchor", help="what to draw instead, e.g. cinema")
    parser.add_argument("--pairs", help="prompt pairs file (JSONL with concept_prompt/anchor_prompt, or a released EAR train file)")
    parser.add_argument("--preserve", default=None,
                        help="prompts whose images must not change (one per line in a .txt, records with a 'prompt', "
                             "or a pairs file, whose anchor prompts are read); not in the EAR paper")
    parser.add_argument("--preserve-weight", type=float, default=None,
                        help=f"weight of the preservation term beside the erasure loss ({default('preserve_weight')})")
    parser.add_argument("--objective", choices=OBJECTIVES, default=None, help=default("objective"))
    parser.add_argument("--eta", type=float, default=None, help=f"negative-guidance strength ({default('eta')})")
    parser.add_argument("--window", type=int, default=None, help=f"WGA window, in image tokens ({default('window')})")
    parser.add_argument("--token-threshold", type=_optional_float, default=None, help="TLM: drop tokens whose loss is <= this")
    parser.add_argument("--window-threshold", type=_optional_float, default=None,
                        help="TLM: drop windows whose kept loss sum is <= this (hidden-mse default 0.05)")
    parser.add_argument("--wga", choices=WGA_MODES, default=None,
                        help=f"parallel: one step per batch; sequential: one step per window ({default('wga')})")
    parser.add_argument("--trainable", action="append", default=None,
                        help=f"glob of parameter names to train; repeatable (default: {DEFAULT_TRAINABLE[0]})")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help=default("optimizer"))
    parser.add_argument("--lr", type=float, default=None, help=default("lr"))
    parser.add_argument("--weight-decay", type=float, default=None, help=default("weight_decay"))
    parser.add_argument("--epochs", type=int, default=None, help=default("epochs"))
    parser.add_argument("--steps", type=int, default=None, help="number of steps (overrides --epochs)")
    parser.add_argument("--batch-size", type=int, default=None, help=f"prompt pairs per step ({default('batch_size')})")
    parser.add_argument("--images-per-prompt", type=int, default=None, help=default("images_per_prompt"))
    parser.add_argument("--grad-clip", type=_optional_float, default=None, help=f"{default('grad_clip')}; none: no clipping")
    parser.add_argument("--gradient-checkpointing", action="store_true", default=None)
    parser.add_argument("--guidance-scale", type=float, default=None, help=default("guidance_scale"))
    parser.add_argument("--temperature", type=float, default=None, help=default("temperature"))
    parser.add_argument("--seed", type=int, default=None, help=default("seed"))
    parser.add_argument("--dtype", default=None, help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32 (default: auto)")
    parser.add_argument("--device", default=None,
                        help="cuda, cuda:1, cpu (default: cuda when available; cpu for the ShapesWorld default)")
    parser.add_argument("--load-in-8bit", action="store_true", default=None, help="frozen weights in 8 bits (bitsandbytes, CUDA)")
    parser.add_argument("--save-every", type=int, default=None, help="steps between checkpoints (default: 0, at the end only)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint, with its "
                                                              "settings (a flag given again must not change them)")
    parser.add_argument("--force", action="store_true", help="start over in an --out that an earlier run wrote")
    parser.add_argument("--eval-images", type=int, default=100,
                        help="ShapesWorld default only: images per shape measured before and after (default: %(default)s)")


# The EraseConfig fields that the erase flags set (the flag is the field with - for _).
ERASE_FLAG_FIELDS = ("pairs", "preserve", "preserve_weight", "objective", "eta", "window", "token_threshold",
                     "window_threshold", "wga", "trainable", "optimizer", "lr", "weight_decay", "epochs", "steps",
                     "batch_size", "images_per_prompt", "grad_clip", "gradient_checkpointing", "guidance_scale",
                     "temperature", "seed", "dtype", "device", "load_in_8bit", "save_every")
# Flags whose None is a value of its own ("none" on the command line): given when spelt out.
OPTIONAL_VALUE_FLAGS = ("token_threshold", "window_threshold", "grad_clip")


def given_erase_fields(args, argv) -> dict:
    """The EraseConfig fields the command line set, and only those."""
    spelt = {token.split("=", 1)[0] for token in argv if token.startswith("--")}
    given = {}
    for name in ERASE_FLAG_FIELDS:
        value = getattr(args, name)
        if value is not None or (name in OPTIONAL_VALUE_FLAGS and "--" + name.replace("_", "-") in spelt):
            given[name] = tuple(value) if name == "trainable" else value
    return given


def resumed_erase_fields(out: str) -> dict:
    """The erase config recorded by the checkpoint in OUT/checkpoint (what --resume continues)."""
    from earkit.engine.checkpoint import checked_checkpoint_folder, read_checkpoint_record

    folder = Path(out).expanduser() / "checkpoint"
    try:
        folder = checked_checkpoint_folder(folder)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"--resume: nothing to resume in {out} ({error})") from None
    saved = read_checkpoint_record(folder)["config"].get("erase")
    if not isinstance(saved, dict):
        raise ValueError(f"--resume: checkpoint {folder} records no erase config")
    if isinstance(saved.get("trainable"), list):
        saved["trainable"] = tuple(saved["trainable"])
    return saved


def run_erase(args) -> None:
    from earkit.engine.model import check_device
    from earkit.engine.trainer import EraseConfig, erase

    given = given_erase_fields(args, args.argv)
    check_device(given.get("device"))  # before anything loads
    if args.model is None:
        return run_default_erase(args, given)
    if args.eval_images != 100:
        raise ValueError("--eval-images applies to the ShapesWorld default only (no --model); measure a Janus "
                         "erasure with earkit eval")
    fields = dict(model=args.model, out=args.out, concept=args.concept, anchor=args.anchor)
    if args.resume:
        saved = resumed_erase_fields(args.out)
        known = {field.name for field in dataclasses.fields(EraseConfig)}
        fields = {**{k: v for k, v in saved.items() if k in known}, **{k: v for k, v in fields.items() if v is not None}}
        fields["out"] = args.out
    config = EraseConfig(**{**fields, **given, "resume": args.resume, "force": args.force})
    result = erase(config)
    last = result.losses[-1] if result.losses else float("nan")
    print(f"erased: {result.steps} steps ({result.optimizer_steps} optimizer steps) in {result.seconds:.1f} s, "
          f"last loss {last:.4f}; checkpoint {result.checkpoint}")


# Flags the ShapesWorld default cannot honour: it makes its own pairs and preserve prompts, and
# its 7 MB generator has nothing to gain from 8-bit weights.
DEFAULT_ERASE_REFUSES = {"pairs": "--pairs", "preserve": "--preserve", "load_in_8bit": "--load-in-8bit"}


def run_default_erase(args, given: dict) -> None:
    """`earkit erase` with no model: the ShapesWorld demonstration, measured before and after.
    Every training flag applies to it (over ShapesWorld's own defaults); --resume continues it."""
    from earkit.engine import shapesworld

    refused = [flag for name, flag in DEFAULT_ERASE_REFUSES.items() if name in given]
    if refused:
        raise ValueError(f"{', '.join(refused)} needs --model: the ShapesWorld default makes its own prompt pairs "
                         "and preserves the other shapes itself")
    settings = {}
    concept, anchor, seed = args.concept, args.anchor, given.pop("seed", None)
    if args.resume:
        saved = resumed_erase_fields(args.out)
        settings = {name: saved[name] for name in ERASE_FLAG_FIELDS if name in saved and name not in DEFAULT_ERASE_REFUSES
                    and name != "seed"}
        concept, anchor = concept or saved.get("concept"), anchor or saved.get("anchor")
        seed = saved.get("seed") if seed is None else seed
    report = shapesworld.erase_and_evaluate(
        out=args.out, concept=concept or shapesworld.DEFAULT_CONCEPT, anchor=anchor or shapesworld.DEFAULT_ANCHOR,
        seed=0 if seed is None else seed, force=args.force, resume=args.resume, n_per_shape=args.eval_images,
        **{**settings, **given},
    )
    print(report)


def add_world_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="world_command", required=True)
    build = commands.add_parser("build", help="train ShapesWorld's VQ tokenizer, generator and judge")
    build.add_argument("--out", required=True, help="the world folder to write")
    build.add_argument("--quick", action="store_true", help="a tiny budget (plumbing only, not quality)")
    build.add_argument("--force", action="store_true",
                       help="replace an earlier world folder (never one holding files earkit did not write)")
    check = commands.add_parser("check", help="measure a world: judge accuracy, generator shape/colour rates")
    check.add_argument("--world", default=None, help="a world folder (default: the shipped one)")
    check.add_argument("--prompts-per-shape", type=int, default=100)
    check.add_argument("--judge-images", type=int, default=1000)
    check.add_argument("--seed", type=int, default=12345)
    check.add_argument("--json", action="store_true", help="print the measurements as JSON")
    check.add_argument("--quiet", action="store_true", help="no progress bar")


def run_world(args) -> None:
    import json

    from earkit.engine import shapesworld

    if args.world_command == "build":
        out = shapesworld.build_world(args.out, quick=args.quick, force=args.force)
        print(f"built ShapesWorld in {out}: {(out / 'world.json').read_text()}")
    else:
        report = shapesworld.check_world(args.world, n_per_shape=args.prompts_per_shape,
                                         judge_images=args.judge_images, seed=args.seed, progress=not args.quiet)
        print(json.dumps(report, indent=1) if args.json else shapesworld.format_check(report))


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    from earkit.ecgvf.images import add_sampling_arguments

    parser.add_argument("--model", default=None, help="Janus model folder or hub id (default: the shipped ShapesWorld)")
    parser.add_argument("--checkpoint", help="an erasure checkpoint folder to apply to the model")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt; repeatable")
    parser.add_argument("--prompts-file", help="a text file, one prompt per line")
    parser.add_argument("--out", required=True, help="folder for the PNGs, grid.png and prompts.json")
    parser.add_argument("--images-per-prompt", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    add_sampling_arguments(parser)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default=None)
    parser.add_argument("--force", action="store_true",
                        help="replace an earlier samples folder (never one holding files earkit did not write)")


def run_sample(args) -> None:
    from pathlib import Path

    from earkit.engine.checkpoint import apply_trainable, load_checkpoint
    from earkit.engine.model import check_device, check_model_source, load_janus
    from earkit.io import read_text_file
    from earkit.engine.sampler import check_samples_folder, check_sampling_arguments, write_samples

    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file).expanduser()
        prompts += [line.strip() for line in read_text_file(path, "prompts file").splitlines() if line.strip()]
    if not prompts:
        raise ValueError("give at least one --prompt or a --prompts-file")
    if any(not prompt.strip() for prompt in prompts):
        raise ValueError("--prompt must not be empty")
    if args.images_per_prompt < 1:
        raise ValueError(f"--images-per-prompt must be at least 1, got {args.images_per_prompt}")
    # Everything that can be wrong is found before minutes of loading weights, and before --out is made.
    check_samples_folder(Path(args.out), force=args.force)
    check_device(args.device)
    if args.model is None:
        from earkit.engine.shapesworld import generator_folder

        args.model = str(generator_folder())
    check_model_source(args.model)
    from earkit.ecgvf.images import resolve_guidance, resolve_temperature

    # given, else the model's generation_config.json, else Janus-Pro's guidance 5 and temperature 1
    args.guidance_scale = resolve_guidance(args.guidance_scale, args.model)
    args.temperature = resolve_temperature(args.temperature, args.model)
    check_sampling_arguments(args.guidance_scale, args.temperature, args.top_k, args.top_p)
    tensors = load_checkpoint(args.checkpoint).tensors if args.checkpoint else None
    model, tokenizer = load_janus(args.model, dtype=args.dtype, device=args.device)
    if tensors is not None:
        apply_trainable(model, tensors)
    written = write_samples(model, tokenizer, prompts, args.out, images_per_prompt=args.images_per_prompt,
                            seed=args.seed, guidance_scale=args.guidance_scale, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, force=args.force)
    print(f"wrote {len(written)} files to {args.out}")


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="the base model the checkpoint was trained from")
    parser.add_argument("--checkpoint", required=True, help="an erasure checkpoint folder (OUT/checkpoint)")
    parser.add_argument("--out", required=True, help="the full model folder to write (from_pretrained loads it)")
    parser.add_argument("--dtype", default=None, help="dtype of the exported weights (default: the base model's)")
    parser.add_argument("--force", action="store_true",
                        help="replace an earlier export by earkit (never another folder, the base model's least of all)")


def run_export(args) -> None:
    from earkit.engine.checkpoint import export_checkpoint

    path = export_checkpoint(args.model, args.checkpoint, args.out, force=args.force, dtype=args.dtype)
    print(f"exported to {path}")


def sized_threads(args):
    """CPU threads sized to the work: one for a small model (the ShapesWorld default) on the CPU,
    where a second thread gains 20% alone and loses 3-10x on a shared machine (bench/load.py);
    torch's default otherwise, and always when the user set OMP_NUM_THREADS."""
    import contextlib
    import os

    if os.environ.get("OMP_NUM_THREADS") or args.command not in ("erase", "sample", "filter", "eval", "world"):
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="earkit", description="Erase concepts from Janus-Pro (EAR), and measure it.")
    commands = parser.add_subparsers(dest="command", required=True)
    add_erase_arguments(commands.add_parser("erase", help="fine-tune a Janus model to erase a concept"))
    add_sample_arguments(commands.add_parser("sample", help="draw images with the CFG sampler"))
    add_export_arguments(commands.add_parser("export", help="write a checkpoint as a full model folder"))
    add_world_arguments(commands.add_parser("world", help="ShapesWorld, the embedded default: build, check"))
    from earkit.ecgvf.pairs import add_pairs_arguments, run_pairs

    add_pairs_arguments(commands.add_parser("pairs", help="generate target/replacement prompt pairs (ECGVF)"))
    from earkit.ecgvf.evaluate import add_eval_arguments, run_eval
    from earkit.ecgvf.filter import add_filter_arguments, run_filter

    add_filter_arguments(commands.add_parser("filter", help="keep the pairs whose images show the concept (ECGVF)"))
    add_eval_arguments(commands.add_parser("eval", help="measure an erasure before and after, with a report (ECGVF)"))
    bench = commands.add_parser("bench", help="benchmarks (python -m earkit.bench)")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="bench arguments, e.g. kernels --quick")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv

    if args.command == "bench":
        from earkit.bench.__main__ import main as bench_main

        bench_main(args.rest)
        return 0
    runner = {"erase": run_erase, "sample": run_sample, "export": run_export, "world": run_world,
              "pairs": run_pairs, "filter": run_filter, "eval": run_eval}[args.command]
    library_format, warnings.formatwarning = warnings.formatwarning, one_line_warning
    try:
        with sized_threads(args):
            runner(args)
    except USAGE_ERRORS as error:
        print(f"earkit {args.command}: error: {error}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = library_format  # main() is also called in-process (tests, notebooks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
