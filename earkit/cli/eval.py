"""`earkit eval`: measure an erasure before and after on a benchmark, and write the report
(earkit.ecgvf.evaluate and earkit.ecgvf.report).

    earkit eval --model WORLD/generator --checkpoint runs/circle/checkpoint --benchmark circle.jsonl --out report/
    earkit eval ... --attacks all      # and the benchmark's target prompts attacked (earkit attack's flags)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from earkit.cli.arguments import (
    add_checkpoint_argument, add_judge_argument, erasure_argument, add_sampling_arguments, check_count,
)
from earkit.cli.attack import add_attack_arguments, ask_paraphrases, attack_settings_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--benchmark", required=True,
                        help="pairs file (earkit pairs / EAR train_*), prompt file (EAR test_*, .txt) or benchmark JSONL")
    parser.add_argument("--out", required=True, help="report folder: metrics.json, summary.md, report.html, images/, charts/")
    parser.add_argument("--model", default=None, help="Janus model folder or hub id (default: the shipped ShapesWorld)")
    add_checkpoint_argument(parser, "the erasure checkpoint (OUT/checkpoint of earkit erase): before = the model, "
                                    "after = the model with it; without: one side")
    add_judge_argument(parser)
    parser.add_argument("--clip", default=None, help="a CLIP model for the CLIP score (shapesworld[:DIR] | "
                                                     "openclip:NAME:WEIGHTS; default: the judge, if it is one)")
    parser.add_argument("--concept", default=None, help="the erased concept (default: the benchmark's own)")
    parser.add_argument("--preserve", default=None, help="a prompt file of more preservation prompts")
    parser.add_argument("--reference-images", default=None, help="a folder of real images: FID of each side against them")
    parser.add_argument("--inception", default=None,
                        help="torchvision Inception-v3 weights file: FID in its features (default: the judge's features)")
    parser.add_argument("--max-prompts", type=int, default=None, help="at most N target and N preservation prompts")
    parser.add_argument("--seeds", type=int, default=2, help="images per prompt, seeds SEED..SEED+N-1 (default: %(default)s)")
    add_sampling_arguments(parser, top_k_p=False)
    parser.add_argument("--batch-size", type=int, default=16, help="images per sampler batch (default: %(default)s)")
    parser.add_argument("--images", default=None,
                        help="a folder to keep every drawn image in as it is drawn (IMAGES/before, IMAGES/after): a "
                             "rerun of a killed eval draws only what is missing; other settings are refused by name")
    parser.add_argument("--nudenet-threshold", type=float, default=None, help="NudeNet detection threshold (default: 0.6)")
    parser.add_argument("--all-images", action="store_true", help="write every image to the report, not only the grids'")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--force", action="store_true", help="replace an existing report folder")
    add_attack_arguments(parser, default_attacks=None)


def check_out_folder(out: Path, force: bool) -> None:
    """Before minutes of sampling: --out is free, or (with --force) an earlier report holding only
    what earkit wrote, and something can be written there."""
    from earkit.ecgvf.evaluate import legacy_report_names
    from earkit.io import check_replaceable, check_writable

    check_replaceable(out, force=force, kind="report", what="report folder", legacy=legacy_report_names)
    check_writable(out, "report folder")


def run_timing(started: float, *, images_drawn: int) -> dict:
    """timing.json: the wall time from the start of sampling and how many processes shared it."""
    from earkit.engine import distributed

    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 3), "ranks": distributed.current().world_size, "images": images_drawn,
            "images_per_second": round(images_drawn / seconds, 3) if seconds > 0 else None}


def run(args) -> dict:
    """Load, sample before and after, judge, measure, write the report atomically."""
    from earkit.ecgvf.benchmark import load_benchmark
    from earkit.ecgvf.evaluate import evaluate, legacy_report_names, load_reference_images
    from earkit.ecgvf.images import resolve_checkpoint, resolve_model
    from earkit.ecgvf.judges import DEFAULT_NUDENET_THRESHOLD, parse_judge
    from earkit.ecgvf.report import write_report
    from earkit.ecgvf.summary import headline
    from earkit.engine import distributed
    from earkit.engine.model import check_device
    from earkit.engine.sampler import check_sampling_arguments, resolve_source_sampling
    from earkit.io import write_folder_atomically

    checkpoint = erasure_argument(args)
    out = Path(args.out).expanduser()
    # before minutes of sampling; rank 0 alone writes --out, and what it finds ends every rank alike
    distributed.main_decides(lambda: check_out_folder(out, args.force), "rank 0's check of --out")
    if args.images is not None:
        images = Path(args.images).expanduser().resolve()
        if images == out.resolve() or out.resolve() in images.parents:
            raise ValueError(f"--images {args.images} is inside the report folder --out {args.out}, which is written "
                             "whole at the end (and replaced by --force): keep the images elsewhere")
    for value, name in ((args.seeds, "--seeds"), (args.batch_size, "--batch-size"), (args.max_prompts, "--max-prompts")):
        check_count(value, name)
    benchmark = load_benchmark(args.benchmark, concept=args.concept, preserve=args.preserve,
                               max_prompts=args.max_prompts)
    model_source = resolve_model(args.model)
    resolve_checkpoint(checkpoint)
    reference = load_reference_images(args.reference_images) if args.reference_images else None
    device = str(check_device(args.device))
    guidance_scale, temperature = resolve_source_sampling(model_source, args.guidance_scale, args.temperature)
    check_sampling_arguments(guidance_scale, temperature, None, None)
    attack_settings = attack_settings_from_args(args, model_source)  # None without --attacks
    ask_paraphrases(attack_settings, benchmark.concept, len(benchmark.target))  # before the minutes of sampling
    threshold = DEFAULT_NUDENET_THRESHOLD if args.nudenet_threshold is None else args.nudenet_threshold
    labels = [benchmark.concept] + [p.concept for p in benchmark.preserve if p.concept]
    judge = parse_judge(args.judge, model_folder=model_source, device=device, labels=labels,
                        nudenet_threshold=threshold)
    clip = judge if args.clip is None and judge.has_text else None
    if args.clip is not None:
        clip = parse_judge(args.clip, model_folder=model_source, device=device, labels=labels)
        if not clip.has_text:
            raise ValueError(f"--clip {args.clip!r} is not a CLIP model (shapesworld[:DIR] or openclip:NAME:WEIGHTS)")
    inception = None
    if args.inception is not None:
        from earkit.ecgvf.judges import InceptionFeatures

        inception = InceptionFeatures(args.inception, device=device)
    seeds = list(range(args.seed, args.seed + args.seeds))
    started = time.perf_counter()
    result, images = evaluate(benchmark, judge, model_source=model_source, checkpoint=checkpoint, seeds=seeds,
                              clip=clip, device=device, dtype=args.dtype, guidance_scale=guidance_scale,
                              temperature=temperature, batch_size=args.batch_size, reference_images=reference,
                              inception=inception, progress=not args.quiet, images_folder=args.images)
    if result is not None:
        timing = run_timing(started, images_drawn=len(seeds) * len(benchmark.target + benchmark.preserve) * len(images))
    attacks = attack_images = None
    if attack_settings is not None:  # every rank draws its share of the attacks' images; rank 0 searches and judges
        from earkit.ecgvf.attacks import attacks_table, run_attacks
        from earkit.ecgvf.report import attacks_block

        attacks_started = time.perf_counter()
        attacks, attack_images = run_attacks(
            model_source, checkpoint=checkpoint, concept=benchmark.concept, prompts=[p.prompt for p in benchmark.target],
            judge=judge, settings=attack_settings, seeds=seeds, guidance_scale=guidance_scale, temperature=temperature,
            batch_size=args.batch_size, device=device, dtype=args.dtype, anchors=benchmark.anchors(),
            progress=not args.quiet)
        if result is not None:
            result["attacks"] = attacks_block(attacks)
            timing["attack_search_seconds"] = attacks["_search_seconds"]
            timing["attack_seconds"] = round(time.perf_counter() - attacks_started, 3)
    if result is None:  # a rank other than 0 of a torchrun job: it drew its share, rank 0 writes
        return None
    write_folder_atomically(out, lambda partial: write_report(partial, result, images, benchmark,
                                                              all_images=args.all_images, timing=timing,
                                                              attacks=attacks, attack_images=attack_images),
                            force=args.force, kind="report", what="report folder", legacy=legacy_report_names)
    print(headline(result))
    if attacks is not None:
        print(attacks_table(attacks))
    print(f"wrote {out / 'metrics.json'}, {out / 'summary.md'} and {out / 'report.html'}")
    return result
