"""ECGVF evaluation (what `earkit eval` runs): measure an erasure on a benchmark, before and after.

    earkit eval --model WORLD/generator --checkpoint runs/circle/checkpoint --benchmark circle.jsonl --out report/

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

Without --checkpoint only the given model is measured (one side, "model").

    benchmark = load_benchmark("circle.jsonl")
    result, images = evaluate(benchmark, judge, model_source="WORLD/generator", checkpoint="runs/circle/checkpoint",
                              seeds=[0, 1])
    write_report(folder, result, images, benchmark)   # into an existing folder: metrics.json, summary.md, ...

metrics.json holds what was measured and nothing of how long it took or on how many processes
(timing.json holds that): the same benchmark, model, seeds and settings give the same bytes,
on one process or on every rank of a torchrun job.
"""

from __future__ import annotations

import math
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


def side_stores(images_folder, side_names, *, model_source, checkpoint, guidance_scale, temperature, batch_size,
                dtype, device) -> dict:
    """{side: ImageStore} in images_folder/SIDE, each check()ed (the settings must match what it
    holds): before any model loads. Empty without images_folder."""
    from earkit.engine.drawing import ImageStore, drawing_identity
    from earkit.engine.model import check_device, resolve_dtype

    if images_folder is None:
        return {}
    device = check_device(device)
    stores = {}
    for name in side_names:
        identity = drawing_identity(model=model_source, checkpoint=checkpoint if name == "after" else None,
                                    guidance_scale=guidance_scale, temperature=temperature, batch_size=batch_size,
                                    dtype=resolve_dtype(dtype, device), device=device)
        stores[name] = ImageStore(Path(images_folder).expanduser() / name, identity, what=f"--images folder ({name})")
        stores[name].check()
    return stores


def evaluate(benchmark, judge, *, model_source, checkpoint=None, seeds, clip=None, device=None, dtype="auto",
             guidance_scale: float = 5.0, temperature: float = 1.0, batch_size: int | None = 16, reference_images=None,
             inception=None, progress: bool = True, images_folder=None) -> tuple[dict | None, dict | None]:
    """(metrics, images): the metrics dict the report is made of, and images[side][role][p][s].

    Under torchrun every rank draws its share of the images and rank 0 alone judges and measures
    them, in the order one process would: the metrics are the same bytes at any world size. The
    other ranks return (None, None). images_folder: keep every drawn image in
    images_folder/SIDE as it is drawn; a rerun draws only what is missing there."""
    from earkit.engine import distributed

    from .images import load_generator, resolve_checkpoint, sample_prompt_images

    judge.check_concept(benchmark.concept)  # fails before the model loads
    side_names = ["before", "after"] if checkpoint is not None else ["model"]
    resolved_checkpoint = resolve_checkpoint(checkpoint)
    main = distributed.current().main
    # only rank 0 reads and writes images_folder; what it finds wrong there ends every rank alike
    stores = distributed.main_decides(
        lambda: side_stores(images_folder, side_names, model_source=model_source, checkpoint=resolved_checkpoint,
                            guidance_scale=guidance_scale, temperature=temperature, batch_size=batch_size,
                            dtype=dtype, device=device),
        "rank 0's check of --images")
    if not main:
        stores = {}
    model, tokenizer = load_generator(model_source, device=device, dtype=dtype)
    prompts = [p.prompt for p in benchmark.target] + [p.prompt for p in benchmark.preserve]
    images = {}
    for name in side_names:
        if name == "after":
            from earkit.engine.checkpoint import apply_trainable, erasure_tensors

            apply_trainable(model, erasure_tensors(model, resolved_checkpoint))
        drawn = sample_prompt_images(model, tokenizer, prompts, seeds, guidance_scale=guidance_scale, temperature=temperature,
                                     batch_size=batch_size, progress=progress, desc=f"eval: sampling ({name})",
                                     store=stores.get(name))
        if drawn is not None:
            images[name] = {"target": drawn[:len(benchmark.target)], "preserve": drawn[len(benchmark.target):]}
    if not main:
        return None, None
    sides = {name: measure_side(images[name], benchmark, judge, clip=clip, seeds=seeds) for name in side_names}
    fill_preservation_from_clip(sides)
    result = {
        "format": REPORT_FORMAT, "benchmark": benchmark.describe(), "judge": judge.describe(),
        "clip": clip.describe() if clip is not None else None, "model": str(model_source),
        "checkpoint": str(resolved_checkpoint) if checkpoint is not None else None, "seeds": list(seeds),
        "settings": {"guidance_scale": guidance_scale, "temperature": temperature, "batch_size": batch_size, "dtype": dtype,
                     "device": str(model.device)},
        "sides": sides, "fid": fid_block(images, judge, clip, reference_images, inception),
    }
    return result, images


REPORT_NAMES = {"metrics.json", "timing.json", "summary.md", "report.html", "images", "charts"}


def legacy_report_names(folder: Path) -> set[str] | None:
    """A report written before manifests existed: its metrics.json says so."""
    metrics = folder / "metrics.json"
    try:  # parse_json: a metrics.json nested too deeply is a ValueError (not a report), not a RecursionError
        record = parse_json(metrics.read_text(encoding="utf-8"), str(metrics))
    except (OSError, ValueError):
        return None
    return REPORT_NAMES if isinstance(record, dict) and record.get("format") == REPORT_FORMAT else None
