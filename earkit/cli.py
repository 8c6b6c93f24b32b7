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
import sys

USAGE_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


def _optional_float(text: str):
    return None if text.lower() == "none" else float(text)


def add_erase_arguments(parser: argparse.ArgumentParser) -> None:
    from earkit.engine.trainer import DEFAULT_TRAINABLE, OPTIMIZERS, WGA_MODES, EraseConfig
    from earkit.engine.objectives import OBJECTIVES

    defaults = EraseConfig(model="")
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
    parser.add_argument("--preserve-weight", type=float, default=defaults.preserve_weight,
                        help="weight of the preservation term beside the erasure loss (default: %(default)s)")
    parser.add_argument("--objective", choices=OBJECTIVES, default=defaults.objective)
    parser.add_argument("--eta", type=float, default=defaults.eta, help="negative-guidance strength (default: %(default)s)")
    parser.add_argument("--window", type=int, default=defaults.window, help="WGA window, in image tokens (default: %(default)s)")
    parser.add_argument("--token-threshold", type=_optional_float, default=None, help="TLM: drop tokens whose loss is <= this")
    parser.add_argument("--window-threshold", type=_optional_float, default=None,
                        help="TLM: drop windows whose kept loss sum is <= this (hidden-mse default 0.05)")
    parser.add_argument("--wga", choices=WGA_MODES, default=defaults.wga,
                        help="parallel: one step per batch; sequential: one step per window (default: %(default)s)")
    parser.add_argument("--trainable", action="append", default=None,
                        help=f"glob of parameter names to train; repeatable (default: {DEFAULT_TRAINABLE[0]})")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=defaults.optimizer)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--steps", type=int, default=None, help="number of steps (overrides --epochs)")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="prompt pairs per step")
    parser.add_argument("--images-per-prompt", type=int, default=defaults.images_per_prompt)
    parser.add_argument("--grad-clip", type=_optional_float, default=defaults.grad_clip)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--guidance-scale", type=float, default=defaults.guidance_scale)
    parser.add_argument("--temperature", type=float, default=defaults.temperature)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--dtype", default=defaults.dtype, help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--load-in-8bit", action="store_true", help="frozen weights in 8 bits (bitsandbytes, CUDA)")
    parser.add_argument("--save-every", type=int, default=defaults.save_every, help="steps between checkpoints (0: at the end)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    parser.add_argument("--force", action="store_true", help="start over in an existing --out")


def run_erase(args) -> None:
    from earkit.engine.trainer import DEFAULT_TRAINABLE, EraseConfig, erase

    if args.model is None:
        return run_default_erase(args)
    config = EraseConfig(
        model=args.model, out=args.out, concept=args.concept, anchor=args.anchor, pairs=args.pairs,
        preserve=args.preserve, preserve_weight=args.preserve_weight,
        objective=args.objective, eta=args.eta, window=args.window, token_threshold=args.token_threshold,
        window_threshold=args.window_threshold, wga=args.wga, trainable=tuple(args.trainable or DEFAULT_TRAINABLE),
        optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay, epochs=args.epochs, steps=args.steps,
        batch_size=args.batch_size, images_per_prompt=args.images_per_prompt, grad_clip=args.grad_clip,
        gradient_checkpointing=args.gradient_checkpointing, guidance_scale=args.guidance_scale,
        temperature=args.temperature, seed=args.seed, dtype=args.dtype, device=args.device,
        load_in_8bit=args.load_in_8bit, save_every=args.save_every, resume=args.resume, force=args.force,
    )
    result = erase(config)
    last = result.losses[-1] if result.losses else float("nan")
    print(f"erased: {result.steps} steps ({result.optimizer_steps} optimizer steps) in {result.seconds:.1f} s, "
          f"last loss {last:.4f}; checkpoint {result.checkpoint}")


def run_default_erase(args) -> None:
    """`earkit erase` with no model: the ShapesWorld demonstration, measured before and after."""
    from earkit.engine import shapesworld

    if args.preserve is not None:
        raise ValueError("--preserve needs --model: the ShapesWorld default preserves the other shapes itself")
    report = shapesworld.erase_and_evaluate(
        out=args.out, concept=args.concept or shapesworld.DEFAULT_CONCEPT,
        anchor=args.anchor or shapesworld.DEFAULT_ANCHOR, seed=args.seed, force=args.force,
    )
    print(report)


def add_world_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="world_command", required=True)
    build = commands.add_parser("build", help="train ShapesWorld's VQ tokenizer, generator and judge")
    build.add_argument("--out", required=True, help="the world folder to write")
    build.add_argument("--quick", action="store_true", help="a tiny budget (plumbing only, not quality)")
    build.add_argument("--force", action="store_true", help="rebuild into an existing folder")
    check = commands.add_parser("check", help="measure a world: judge accuracy, generator shape/colour rates")
    check.add_argument("--world", default=None, help="a world folder (default: the shipped one)")
    check.add_argument("--prompts-per-shape", type=int, default=100)
    check.add_argument("--judge-images", type=int, default=1000)
    check.add_argument("--seed", type=int, default=12345)
    check.add_argument("--json", action="store_true", help="print the measurements as JSON")


def run_world(args) -> None:
    import json

    from earkit.engine import shapesworld

    if args.world_command == "build":
        out = shapesworld.build_world(args.out, quick=args.quick, force=args.force)
        print(f"built ShapesWorld in {out}: {(out / 'world.json').read_text()}")
    else:
        report = shapesworld.check_world(args.world, n_per_shape=args.prompts_per_shape,
                                         judge_images=args.judge_images, seed=args.seed)
        print(json.dumps(report, indent=1) if args.json else shapesworld.format_check(report))


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="Janus model folder or hub id (default: the shipped ShapesWorld)")
    parser.add_argument("--checkpoint", help="an erasure checkpoint folder to apply to the model")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt; repeatable")
    parser.add_argument("--prompts-file", help="a text file, one prompt per line")
    parser.add_argument("--out", required=True, help="folder for the PNGs, grid.png and prompts.json")
    parser.add_argument("--images-per-prompt", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="CFG scale (default: 5, Janus-Pro's, or a ShapesWorld generator's own, 1.5)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="default: 1, or ShapesWorld's own temperature for a ShapesWorld generator")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default=None)
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out")


def run_sample(args) -> None:
    from pathlib import Path

    from earkit.engine.checkpoint import apply_trainable, load_checkpoint
    from earkit.engine.model import load_janus
    from earkit.engine.sampler import write_samples

    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file {path} does not exist")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError("give at least one --prompt or a --prompts-file")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:  # before minutes of loading weights
        raise FileExistsError(f"output folder {out} is not empty (pass --force to replace it)")
    if args.model is None:
        from earkit.engine.shapesworld import generator_folder

        args.model = str(generator_folder())
    from earkit.ecgvf.images import resolve_guidance, resolve_temperature

    # Janus-Pro's guidance 5 and temperature 1, or a ShapesWorld generator's own sampling
    args.guidance_scale = resolve_guidance(args.guidance_scale, args.model)
    args.temperature = resolve_temperature(args.temperature, args.model)
    model, tokenizer = load_janus(args.model, dtype=args.dtype, device=args.device)
    if args.checkpoint:
        apply_trainable(model, load_checkpoint(args.checkpoint).tensors)
    written = write_samples(model, tokenizer, prompts, args.out, images_per_prompt=args.images_per_prompt,
                            seed=args.seed, guidance_scale=args.guidance_scale, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, force=args.force)
    print(f"wrote {len(written)} files to {args.out}")


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="the base model the checkpoint was trained from")
    parser.add_argument("--checkpoint", required=True, help="an erasure checkpoint folder (OUT/checkpoint)")
    parser.add_argument("--out", required=True, help="the full model folder to write (from_pretrained loads it)")
    parser.add_argument("--dtype", default=None, help="dtype of the exported weights (default: the base model's)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")


def run_export(args) -> None:
    from earkit.engine.checkpoint import export_checkpoint

    path = export_checkpoint(args.model, args.checkpoint, args.out, force=args.force, dtype=args.dtype)
    print(f"exported to {path}")


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
    args = parser.parse_args(argv)

    if args.command == "bench":
        from earkit.bench.__main__ import main as bench_main

        bench_main(args.rest)
        return 0
    runner = {"erase": run_erase, "sample": run_sample, "export": run_export, "world": run_world,
              "pairs": run_pairs, "filter": run_filter, "eval": run_eval}[args.command]
    try:
        runner(args)
    except USAGE_ERRORS as error:
        print(f"earkit {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
