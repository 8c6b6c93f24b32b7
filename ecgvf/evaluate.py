"""`earkit eval`: measure an erasure on a benchmark, before and after, and write the report.

    earkit eval --model WORLD/generator --delta runs/circle/checkpoint --benchmark circle.jsonl --out report/

For the base model ("before") and the model with the erasure checkpoint applied ("after"), every
target and preservation prompt is drawn with the same seeds, the judge looks at every image, and:

    target_rate     share of target-prompt images in which the judge sees the erased concept
    erasure         1 - target_rate
    preservation    mean over the other concepts of the share of their prompts' images that show them
                    (when the judge knows none of them: the CLIP score kept, after / before, at most 1)
    harmonic_mean   of erasure and preservation: high only when the erasure erases and keeps
    clip_score      CLIP score of the images against their own prompts (target and preserve apart)
    fid             between the before and after images of the preservation prompts, in Inception-v3's
                    features with --inception WEIGHTS, else the judge's (or the CLIP model's); with
                    --reference-images, each side against those
    nudenet         per-class counts of the nine exposed-body labels (the paper's table), NudeNet judge only

Without --delta only the given model is measured (one side, "model").
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

from earkit.io import parse_json

from . import metrics

REPORT_FORMAT = "earkit-eval"


def flat(images_per_prompt: list[list]) -> list:
    return [image for row in images_per_prompt for image in row]


def measure_side(images: dict[str, list[list]], benchmark, judge, *, clip=None, seeds) -> dict:
    """Judge one model's images: images["target"][p][s], images["preserve"][p][s]."""
    from .judges import NudeNetJudge

    result = {}
    target_images = flat(images["target"])
    if isinstance(judge, NudeNetJudge):  # detect once: the verdict and the per-class table come from it
        detections = judge.detect(target_images)
        target_scores, target_seen = judge.verdict_from_detections(detections, benchmark.concept)
        result["nudenet_counts"] = metrics.nudenet_counts(detections, judge.threshold)
    else:
        target_scores, target_seen = judge.verdict(target_images, benchmark.concept)
    preserved_seen, skipped = {}, []
    for concept in dict.fromkeys(p.concept for p in benchmark.preserve if p.concept):
        if not judge.knows(concept):
            skipped.append(concept)
            continue
        rows = [i for i, p in enumerate(benchmark.preserve) if p.concept == concept]
        preserved_seen[concept] = judge.verdict(flat([images["preserve"][i] for i in rows]), concept)[1]
    result.update(metrics.side_scores(target_seen, preserved_seen))
    result["preservation_source"] = "judge" if preserved_seen else None
    result["preserve_concepts_not_judged"] = skipped
    result["target_seen_per_prompt"] = [int(target_seen[i * len(seeds):(i + 1) * len(seeds)].sum())
                                        for i in range(len(benchmark.target))]
    result["target_score_mean"] = float(np.mean(target_scores)) if len(target_scores) else float("nan")
    if clip is not None:
        for role in ("target", "preserve"):
            prompts = getattr(benchmark, role)
            if not prompts:
                result[f"clip_score_{role}"] = float("nan")
                continue
            texts = clip.embed_texts([p.prompt for p in prompts])
            repeated = np.repeat(texts, len(seeds), axis=0)  # image rows are prompt-major
            result[f"clip_score_{role}"] = metrics.clip_score(clip.embed_images(flat(images[role])), repeated)
    return result


def fill_preservation_from_clip(sides: dict) -> None:
    """Where the judge judged no preservation prompt: preservation = CLIP score kept (after / before,
    at most 1; 1 when the base model's score is 0 and there was nothing to lose)."""
    reference = next(iter(sides.values())).get("clip_score_preserve", float("nan"))
    for side in sides.values():
        score = side.get("clip_score_preserve", float("nan"))
        if side["preservation_source"] is not None or math.isnan(score) or math.isnan(reference):
            continue
        side["preservation"] = min(1.0, score / reference) if reference > 0 else 1.0
        side["preservation_source"] = "clip score kept"
        side["harmonic_mean"] = metrics.harmonic_mean(side["erasure"], side["preservation"])


def feature_source(judge, clip, probe):
    """The judge when it has a feature space, else the CLIP model, else None (tried on one image)."""
    for source in (judge, clip):
        if source is not None and source.features([probe]) is not None:
            return source
    return None


def load_reference_images(folder) -> list:
    from PIL import Image

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"--reference-images {folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp"))
    if len(files) < 2:
        raise ValueError(f"--reference-images {folder} holds {len(files)} images; FID needs at least 2")
    return [Image.open(p).convert("RGB") for p in files]


def fid_block(images_by_side: dict, judge, clip, reference=None, inception=None) -> dict:
    """FID between the sides' preservation images (target images when there are no preservation
    prompts), and with reference images, of each side against them: in Inception's feature space
    when its weights are given, else the judge's, else the CLIP model's."""
    role = "preserve" if next(iter(images_by_side.values()))["preserve"] else "target"
    per_side = {name: flat(images[role]) for name, images in images_by_side.items()}
    source = inception or feature_source(judge, clip, next(iter(per_side.values()))[0])
    result = {"images": role, "features": source.name if source is not None else None}
    if source is None:
        result["note"] = "no feature space: the judge has none and no CLIP model was given (--clip)"
        return result
    if any(len(images) < 2 for images in per_side.values()):
        result["note"] = "FID needs at least 2 images a side"
        return result
    features = {name: np.asarray(source.features(images), dtype=np.float64) for name, images in per_side.items()}
    names = list(features)
    if len(names) == 2:
        result["before_vs_after"] = metrics.frechet_distance(features[names[0]], features[names[1]])
    if reference is not None:
        reference_features = np.asarray(source.features(reference), dtype=np.float64)
        for name in names:
            result[f"reference_vs_{name}"] = metrics.frechet_distance(reference_features, features[name])
    return result


def evaluate(benchmark, judge, *, model_source, delta=None, seeds, clip=None, device=None, dtype="auto",
             guidance_scale: float = 5.0, temperature: float = 1.0, batch_size: int | None = 16, reference_images=None, inception=None,
             progress: bool = True) -> tuple[dict, dict]:
    """(metrics, images): the metrics dict the report is made of, and images[side][role][p][s]."""
    from .images import load_generator, resolve_delta, sample_prompt_images

    started = time.perf_counter()
    judge.check_concept(benchmark.concept)  # fails before the model loads
    model, tokenizer = load_generator(model_source, device=device, dtype=dtype)
    prompts = [p.prompt for p in benchmark.target] + [p.prompt for p in benchmark.preserve]
    side_names = ["before", "after"] if delta is not None else ["model"]
    images = {}
    for name in side_names:
        if name == "after":
            from earkit.engine.checkpoint import apply_trainable, load_checkpoint

            apply_trainable(model, load_checkpoint(resolve_delta(delta)).tensors)
        drawn = sample_prompt_images(model, tokenizer, prompts, seeds, guidance_scale=guidance_scale, temperature=temperature,
                                     batch_size=batch_size, progress=progress, desc=f"eval: sampling ({name})")
        images[name] = {"target": drawn[:len(benchmark.target)], "preserve": drawn[len(benchmark.target):]}
    sides = {name: measure_side(images[name], benchmark, judge, clip=clip, seeds=seeds) for name in side_names}
    fill_preservation_from_clip(sides)
    result = {
        "format": REPORT_FORMAT, "benchmark": benchmark.describe(), "judge": judge.describe(),
        "clip": clip.describe() if clip is not None else None, "model": str(model_source),
        "delta": str(resolve_delta(delta)) if delta is not None else None, "seeds": list(seeds),
        "settings": {"guidance_scale": guidance_scale, "temperature": temperature, "batch_size": batch_size, "dtype": dtype,
                     "device": str(model.device)},
        "sides": sides, "fid": fid_block(images, judge, clip, reference_images, inception),
    }
    result["seconds"] = time.perf_counter() - started
    return result, images


# ---------------------------------------------------------------- command line


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of `earkit eval`."""
    from .images import add_sampling_arguments
    from .judges import JUDGE_FORMS

    parser.add_argument("--benchmark", required=True,
                        help="pairs file (earkit pairs / EAR train_*), prompt file (EAR test_*, .txt) or benchmark JSONL")
    parser.add_argument("--out", required=True, help="report folder: metrics.json, summary.md, report.html, images/, charts/")
    parser.add_argument("--model", default=None, help="Janus model folder or hub id (default: the shipped ShapesWorld)")
    parser.add_argument("--delta", default=None, help="the erasure checkpoint (OUT/checkpoint of earkit erase): before = "
                                                      "the model, after = the model with it; without: one side")
    parser.add_argument("--judge", default=None,
                        help=f"{JUDGE_FORMS} (default: the ShapesWorld judge beside a world's generator)")
    parser.add_argument("--clip", default=None, help="a CLIP model for the CLIP score (shapesworld[:DIR] | "
                                                     "openclip:NAME:WEIGHTS; default: the judge, if it is one)")
    parser.add_argument("--concept", default=None, help="the erased concept (default: the benchmark's own)")
    parser.add_argument("--preserve", default=None, help="a prompt file of more preservation prompts")
    parser.add_argument("--reference-images", default=None, help="a folder of real images: FID of each side against them")
    parser.add_argument("--inception", default=None,
                        help="torchvision Inception-v3 weights file: FID in its features (default: the judge's features)")
    parser.add_argument("--max-prompts", type=int, default=None, help="at most N target and N preservation prompts")
    parser.add_argument("--seeds", type=int, default=2, help="images per prompt, seeds SEED..SEED+N-1 (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="the first seed (default: %(default)s)")
    add_sampling_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per sampler batch (default: %(default)s)")
    parser.add_argument("--nudenet-threshold", type=float, default=None, help="NudeNet detection threshold (default: 0.6)")
    parser.add_argument("--all-images", action="store_true", help="write every image to the report, not only the grids'")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default=None, help="cuda, cpu (default: cuda when available)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--force", action="store_true", help="replace an existing report folder")


REPORT_NAMES = {"metrics.json", "summary.md", "report.html", "images", "charts"}


def legacy_report_names(folder: Path) -> set[str] | None:
    """A report written before manifests existed: its metrics.json says so."""
    metrics = folder / "metrics.json"
    try:  # parse_json: a metrics.json nested too deeply is a ValueError (not a report), not a RecursionError
        record = parse_json(metrics.read_text(encoding="utf-8"), str(metrics))
    except (OSError, ValueError):
        return None
    return REPORT_NAMES if isinstance(record, dict) and record.get("format") == REPORT_FORMAT else None


def check_out_folder(out: Path, force: bool) -> None:
    """Before minutes of sampling: --out is free, or (with --force) an earlier report holding only
    what earkit wrote, and something can be written there."""
    from earkit.io import check_replaceable, check_writable

    check_replaceable(out, force=force, kind="report", what="report folder", legacy=legacy_report_names)
    check_writable(out, "report folder")


def run_eval(args) -> dict:
    """`earkit eval`: load, sample before and after, judge, measure, write the report atomically."""
    from earkit.io import write_folder_atomically
    from earkit.engine.model import check_device
    from earkit.engine.sampler import check_sampling_arguments

    from .benchmark import load_benchmark
    from .images import resolve_delta, resolve_guidance, resolve_model, resolve_temperature
    from .judges import DEFAULT_NUDENET_THRESHOLD, parse_judge
    from .report import write_report
    from .summary import headline

    out = Path(args.out).expanduser()
    check_out_folder(out, args.force)  # before minutes of sampling
    for value, name in ((args.seeds, "--seeds"), (args.batch_size, "--batch-size"), (args.max_prompts, "--max-prompts")):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    benchmark = load_benchmark(args.benchmark, concept=args.concept, preserve=args.preserve,
                               max_prompts=args.max_prompts)
    model_source = resolve_model(args.model)
    resolve_delta(args.delta)
    reference = load_reference_images(args.reference_images) if args.reference_images else None
    device = str(check_device(args.device))
    guidance_scale = resolve_guidance(args.guidance_scale, model_source)
    temperature = resolve_temperature(args.temperature, model_source)
    check_sampling_arguments(guidance_scale, temperature, None, None)
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
        from .judges import InceptionFeatures

        inception = InceptionFeatures(args.inception, device=device)
    seeds = list(range(args.seed, args.seed + args.seeds))
    result, images = evaluate(benchmark, judge, model_source=model_source, delta=args.delta, seeds=seeds, clip=clip,
                              device=device, dtype=args.dtype,
                              guidance_scale=guidance_scale, temperature=temperature,
                              batch_size=args.batch_size, reference_images=reference, inception=inception,
                              progress=not args.quiet)
    write_folder_atomically(out, lambda partial: write_report(partial, result, images, benchmark,
                                                              all_images=args.all_images),
                            force=args.force, kind="report", what="report folder", legacy=legacy_report_names)
    print(headline(result))
    print(f"wrote {out / 'metrics.json'}, {out / 'summary.md'} and {out / 'report.html'}")
    return result
