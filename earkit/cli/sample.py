"""`earkit sample`: draw images with the CFG sampler, from a model and optionally an erasure checkpoint."""

from __future__ import annotations

import argparse

from earkit.cli.arguments import add_sampling_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="Janus model folder or hub id (default: the shipped ShapesWorld)")
    parser.add_argument("--checkpoint", help="an erasure checkpoint folder to apply to the model")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt; repeatable")
    parser.add_argument("--prompts-file", help="a prompt file: .txt, one prompt per line, or prompt records in "
                                               ".json, .jsonl or .csv (a prompt field or column)")
    parser.add_argument("--out", required=True, help="folder for the PNGs, grid.png and prompts.json")
    parser.add_argument("--images-per-prompt", type=int, default=1,
                        help="images per prompt (default: %(default)s)")
    add_sampling_arguments(parser)
    parser.add_argument("--force", action="store_true",
                        help="replace an earlier samples folder (never one holding files earkit did not write)")


def run(args) -> None:
    from pathlib import Path

    from earkit.engine.checkpoint import apply_trainable, load_checkpoint
    from earkit.engine.model import check_device, check_model_source, load_janus
    from earkit.io import read_prompts
    from earkit.engine.sampler import check_samples_folder, check_sampling_arguments, resolve_source_sampling, write_samples

    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += read_prompts(args.prompts_file, "prompts file")
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

    # given, else the model's generation_config.json, else Janus-Pro's guidance 5 and temperature 1
    args.guidance_scale, args.temperature = resolve_source_sampling(args.model, args.guidance_scale, args.temperature)
    check_sampling_arguments(args.guidance_scale, args.temperature, args.top_k, args.top_p)
    tensors = load_checkpoint(args.checkpoint).tensors if args.checkpoint else None
    model, tokenizer = load_janus(args.model, dtype=args.dtype, device=args.device)
    if tensors is not None:
        apply_trainable(model, tensors)
    written = write_samples(model, tokenizer, prompts, args.out, images_per_prompt=args.images_per_prompt,
                            seed=args.seed, guidance_scale=args.guidance_scale, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, force=args.force)
    print(f"wrote {len(written)} files to {args.out}")
