"""`earkit filter`: keep the pairs whose images show the concept (ECGVF): sample both prompts of
every pair with several seeds, let the judge look, write the kept pairs and every decision
(earkit.ecgvf.filter)."""

from __future__ import annotations

import argparse
from pathlib import Path

from earkit.cli.arguments import (
    add_checkpoint_argument, add_judge_argument, erasure_argument, add_old_name, add_sampling_arguments, check_count,
)
from earkit.ecgvf.filter import FilterRules


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", required=True, help="pairs file: earkit JSONL (earkit pairs) or a released EAR train file")
    parser.add_argument("--out", required=True, help="kept pairs JSONL to write; OUT_STEM.decisions.jsonl goes beside it")
    parser.add_argument("--model", default=None, help="Janus model folder or hub id (default: the shipped ShapesWorld)")
    add_checkpoint_argument(parser, "an erasure checkpoint folder to apply to the model first")
    add_judge_argument(parser)
    parser.add_argument("--concept", default=None,
                        help="the concept the judge looks for (default: each pair's own; nudity pairs: --concept nudity)")
    parser.add_argument("--seeds", type=int, default=4, help="images per prompt, seeds SEED..SEED+N-1 (default: %(default)s)")
    add_sampling_arguments(parser, top_k_p=False)
    parser.add_argument("--min-concept-prompt-rate", type=float, default=FilterRules.min_concept_prompt_rate,
                        help="keep only if the concept prompt shows the concept in at least this share of its "
                             "images (default: %(default)s)")
    parser.add_argument("--max-anchor-prompt-rate", type=float, default=FilterRules.max_anchor_prompt_rate,
                        help="keep only if the anchor prompt shows the concept in at most this share (default: %(default)s)")
    add_old_name(parser, "--min-original-rate", "--min-concept-prompt-rate", type=float)
    add_old_name(parser, "--max-replacement-rate", "--max-anchor-prompt-rate", type=float)
    parser.add_argument("--min-anchor-rate", type=float, default=None,
                        help="also require the anchor prompt to show its anchor this often (where the judge knows it)")
    parser.add_argument("--max-pairs", type=int, default=None, help="filter only the first N pairs")
    parser.add_argument("--batch-size", type=int, default=16, help="images per sampler batch (default: %(default)s)")
    parser.add_argument("--images", default=None,
                        help="a folder to keep every drawn image in as it is drawn: a rerun of a killed filter "
                             "draws only what is missing; other settings are refused by name")
    parser.add_argument("--nudenet-threshold", type=float, default=None, help="NudeNet detection threshold (default: 0.6)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")


def run(args) -> dict:
    """Sample, judge, keep and drop, write both files, print the summary."""
    from earkit.ecgvf.filter import check_outputs, filter_pairs_with_model, filter_summary, pair_concept, write_filter_results
    from earkit.ecgvf.images import load_generator, resolve_checkpoint, resolve_model
    from earkit.ecgvf.judges import DEFAULT_NUDENET_THRESHOLD, parse_judge
    from earkit.engine import distributed
    from earkit.engine.drawing import ImageStore, drawing_identity
    from earkit.engine.model import check_device, resolve_dtype
    from earkit.engine.pair_files import load_pairs
    from earkit.engine.sampler import check_sampling_arguments, resolve_source_sampling
    from earkit.io import check_writable

    checkpoint = erasure_argument(args)
    out = Path(args.out).expanduser()
    def check_out() -> None:  # before minutes of sampling
        check_outputs(out, force=args.force)
        check_writable(out, "--out")

    # rank 0 alone writes --out, and what it finds wrong there ends every rank alike
    distributed.main_decides(check_out, "rank 0's check of --out")
    check_count(args.seeds, "--seeds")
    check_count(args.max_pairs, "--max-pairs")
    check_count(args.batch_size, "--batch-size")
    rules = FilterRules(args.min_concept_prompt_rate, args.max_anchor_prompt_rate, args.min_anchor_rate).validate()
    pairs = load_pairs(args.pairs)[:args.max_pairs]
    model_source = resolve_model(args.model)
    resolve_checkpoint(checkpoint)
    device = str(check_device(args.device))
    guidance_scale, temperature = resolve_source_sampling(model_source, args.guidance_scale, args.temperature)
    check_sampling_arguments(guidance_scale, temperature, None, None)
    threshold = DEFAULT_NUDENET_THRESHOLD if args.nudenet_threshold is None else args.nudenet_threshold
    labels = [args.concept] if args.concept else [p.concept for p in pairs if p.concept]
    labels += [p.anchor for p in pairs if p.anchor]
    judge = parse_judge(args.judge, model_folder=model_source, device=device, labels=labels,
                        nudenet_threshold=threshold)
    for index, pair in enumerate(pairs):  # an unknown concept fails now, not after the sampling
        judge.check_concept(pair_concept(pair, args.concept, index))
    store = None
    if args.images is not None:
        identity = drawing_identity(model=model_source, checkpoint=resolve_checkpoint(checkpoint),
                                    guidance_scale=guidance_scale, temperature=temperature, batch_size=args.batch_size,
                                    dtype=resolve_dtype(args.dtype, check_device(device)), device=device)
        store = ImageStore(args.images, identity, what="--images folder")
        # other settings than the images there were drawn with: refused before loading, on every
        # rank alike; only rank 0 reads and writes the folder
        distributed.main_decides(store.check, "rank 0's check of --images")
        if not distributed.current().main:
            store = None
    model, tokenizer = load_generator(model_source, checkpoint=checkpoint, device=device, dtype=args.dtype)
    seeds = list(range(args.seed, args.seed + args.seeds))
    records = filter_pairs_with_model(model, tokenizer, pairs, judge, seeds=seeds, concept=args.concept, rules=rules,
                                      guidance_scale=guidance_scale, temperature=temperature,
                                      batch_size=args.batch_size, progress=not args.quiet, store=store)
    if records is None:  # a rank other than 0 of a torchrun job: it drew its share, rank 0 writes
        return None
    kept_path, decisions = write_filter_results(records, out, force=args.force, judge=judge.describe(), rules=rules)
    summary = filter_summary(records)
    print(f"filter: {summary['pairs']} pairs, {len(seeds)} seeds, judge {judge.name}: kept {summary['kept']}, "
          f"dropped {summary['dropped']}" + "".join(f"\n  dropped, {reason}: {n}"
                                                    for reason, n in summary["dropped_by_reason"].items()))
    for record in records[:5]:
        if not record["kept"]:
            print(f"  e.g. pair {record['index']} ({record['concept_prompt']!r}): {'; '.join(record['details'])}")
            break
    print(f"wrote {summary['kept']} kept pairs to {kept_path} and every decision to {decisions}")
    return summary
