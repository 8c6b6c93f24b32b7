"""`earkit sample`: draw images with the CFG sampler, from a model and optionally an erasure checkpoint."""

from __future__ import annotations

import argparse

from earkit.cli.arguments import add_checkpoint_argument, add_sampling_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="Janus model folder or hub id (default: the shipped ShapesWorld)")
    add_checkpoint_argument(parser, "an erasure checkpoint folder to apply to the model")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt; repeatable")
    parser.add_argument("--prompts-file", "--prompts", dest="prompts_file", help="a prompt file: .txt, one prompt per line, or prompt records in "
                                               ".json, .jsonl or .csv (a prompt field or column)")
    parser.add_argument("--out", required=True, help="folder for the PNGs, grid.png and prompts.json; images are "
                                                     "written as they are drawn, and a rerun with the same prompts "
                                                     "and settings draws only the missing ones")
    parser.add_argument("--images-per-prompt", type=int, default=1,
                        help="images per prompt (default: %(default)s)")
    add_sampling_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=16, help="images per sampler batch (default: %(default)s)")
    parser.add_argument("--force", action="store_true",
                        help="replace an earlier samples folder (never one holding files earkit did not write)")


def run(args) -> None:
    from pathlib import Path

    from earkit.cli.arguments import check_count, erasure_argument
    from earkit.engine import distributed
    from earkit.engine.checkpoint import apply_trainable, erasure_tensors
    from earkit.engine.drawing import drawing_identity
    from earkit.engine.model import check_device, check_model_source, load_janus, resolve_dtype
    from earkit.engine.sampler import (
        check_samples_folder, check_sampling_arguments, resolve_source_sampling, samples_identity, write_samples,
    )
    from earkit.ecgvf.images import resolve_checkpoint
    from earkit.io import read_prompts

    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += read_prompts(args.prompts_file, "prompts file")
    if not prompts:
        raise ValueError("give at least one --prompt or a --prompts-file")
    if any(not prompt.strip() for prompt in prompts):
        raise ValueError("--prompt must not be empty")
    if args.images_per_prompt < 1:
        raise ValueError(f"--images-per-prompt must be at least 1, got {args.images_per_prompt}")
    check_count(args.batch_size, "--batch-size")
    # Everything that can be wrong is found before minutes of loading weights, and before --out is made.
    device = check_device(args.device)
    if args.model is None:
        from earkit.engine.shapesworld import generator_folder

        args.model = str(generator_folder())
    check_model_source(args.model)
    checkpoint = resolve_checkpoint(erasure_argument(args))

    # given, else the model's generation_config.json, else Janus-Pro's guidance 5 and temperature 1
    args.guidance_scale, args.temperature = resolve_source_sampling(args.model, args.guidance_scale, args.temperature)
    check_sampling_arguments(args.guidance_scale, args.temperature, args.top_k, args.top_p)
    identity = drawing_identity(model=args.model, checkpoint=checkpoint, guidance_scale=args.guidance_scale,
                                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                batch_size=args.batch_size, dtype=resolve_dtype(args.dtype, device), device=device)
    # only rank 0 reads and writes --out; what it finds wrong there ends every rank alike
    state = distributed.main_decides(
        lambda: check_samples_folder(Path(args.out), force=args.force,
                                     identity=samples_identity(identity, prompts, args.images_per_prompt, args.seed)),
        "rank 0's check of --out")
    if state == "continue":
        print(f"continuing the samples in {args.out}: drawing only the images that are missing")
    model, tokenizer = load_janus(args.model, dtype=args.dtype, device=args.device)
    if checkpoint is not None:
        apply_trainable(model, erasure_tensors(model, checkpoint))
    written = write_samples(model, tokenizer, prompts, args.out, images_per_prompt=args.images_per_prompt,
                            seed=args.seed, guidance_scale=args.guidance_scale, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, force=args.force, batch_size=args.batch_size,
                            identity=identity)
    if written is not None:
        print(f"wrote {len(written)} files to {args.out}")
