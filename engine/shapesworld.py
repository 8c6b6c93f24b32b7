"""ShapesWorld, the embedded default: build it, check it, and erase a shape from it.

    earkit world build --out DIR     # VQ tokenizer + tiny Janus generator + open_clip judge
    earkit world check [--world DIR] # judge accuracy, and how often the generator draws what is asked
    earkit erase                     # no arguments: erase "circle" (-> "square") from the shipped world

A built world is a folder with `generator/` (a JanusForConditionalGeneration folder with its
tokenizer: what `--model` points at), `judge/` (the open_clip judge) and `world.json`. The one
shipped inside the package (`engine/shapesworld/`) is what every command uses when no model is
given, so nothing is built or downloaded at first run.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

from . import world

DEFAULT_WORLD = Path(__file__).resolve().parent / "shapesworld"
DEFAULT_CONCEPT, DEFAULT_ANCHOR = "circle", "square"
EVAL_TEMPLATES = ("a {colour} {shape}", "a photo of a {colour} {shape}", "a picture of a {size} {colour} {shape}")
# ShapesWorld's generator is sampled with light guidance at a middling temperature. Measured on a
# build of the shipped recipe (60 prompts per shape, share drawn as asked): guidance 1 / temperature
# 1 (the model's own distribution) 97.3%, 1.5 / 0.5 98.0%, 1.5 / 0.2 98.3%, 2 / 0.2 82%; at 1 /
# 0.2, 79%: a low temperature with little guidance leaves many images empty, since where a shape
# starts is spread over a few dozen positions and each of them alone is less likely than more
# background. Guidance much above 2 extrapolates from the weak unconditional prediction (10% of
# training rows) and tears shapes apart.
GUIDANCE_SCALE = 1.5
TEMPERATURE = 0.5
PAIR_TEMPLATES = ("a {colour} {shape}", "a photo of a {colour} {shape}", "a {size} {colour} {shape}",
                  "a {colour} {shape} on a {background} background", "an image of a {colour} {shape}")


def default_world() -> Path:
    if not (DEFAULT_WORLD / "generator" / "config.json").is_file():
        raise FileNotFoundError(f"this install has no ShapesWorld default at {DEFAULT_WORLD}: pass --model with "
                                "a Janus model folder (or a world built by `earkit world build`, DIR/generator)")
    return DEFAULT_WORLD


def generator_folder(world_folder: str | Path | None = None) -> Path:
    return Path(world_folder or default_world()) / "generator"


def judge_folder(world_folder: str | Path | None = None) -> Path:
    return Path(world_folder or default_world()) / "judge"


def load_judge(world_folder: str | Path | None = None):
    from .world_judge import WorldJudge

    return WorldJudge.load(judge_folder(world_folder))


def erasure_pairs(concept: str = DEFAULT_CONCEPT, anchor: str = DEFAULT_ANCHOR, seed: int = 0):
    """Concept/anchor prompt pairs in ShapesWorld's own words: every colour, several templates."""
    from .pairs import PromptPair

    rng = random.Random(seed)
    pairs = []
    for colour in world.COLOURS:
        for template in PAIR_TEMPLATES:
            words = dict(colour=colour, size=rng.choice(list(world.SIZES)),
                         background=rng.choice(list(world.BACKGROUNDS)))
            pairs.append(PromptPair(template.format(shape=concept, **words), template.format(shape=anchor, **words),
                                    concept, anchor))
    return pairs


def preserve_prompts(concept: str = DEFAULT_CONCEPT, seed: int = 0) -> list[str]:
    """Prompts of every other shape, in the pair templates and every colour: what the erasure must
    keep drawing (the trainer's `preserve`). Evaluation draws other images (other seeds) from
    prompts of its own templates, two of which these share: the world has few ways to say it."""
    rng = random.Random(seed)
    return [template.format(shape=shape, colour=colour, size=rng.choice(list(world.SIZES)),
                            background=rng.choice(list(world.BACKGROUNDS)))
            for shape in world.SHAPES if shape != concept for colour in world.COLOURS for template in PAIR_TEMPLATES]


def evaluation_prompts(shape: str, n: int, seed: int) -> list[str]:
    rng = random.Random(f"{seed}-{shape}")
    return [rng.choice(EVAL_TEMPLATES).format(shape=shape, colour=rng.choice(list(world.COLOURS)),
                                              size=rng.choice(list(world.SIZES))) for _ in range(n)]


@dataclass
class ShapeRates:
    """Per requested shape: the share of images the judge sees that shape in, and the right colour."""

    shape: dict[str, float]
    colour: dict[str, float]
    n_per_shape: int


def shape_rates(model, tokenizer, judge, *, shapes=world.SHAPES, n_per_shape: int = 40, seed: int = 0,
                guidance_scale: float | None = None, temperature: float | None = None,
                batch_size: int = 64, on_shape=None) -> ShapeRates:
    """Sample n_per_shape images per shape (random colours and templates) and judge them;
    on_shape(shape), when given, is called after each shape (a progress bar's tick)."""
    from .sampler import decode_images, sample_image_tokens

    shape_rate, colour_rate = {}, {}
    for index, shape in enumerate(shapes):
        prompts = evaluation_prompts(shape, n_per_shape, seed)
        tokens = sample_image_tokens(model, tokenizer, prompts, guidance_scale=guidance_scale or GUIDANCE_SCALE,
                                     temperature=temperature or TEMPERATURE, seed=seed + index,
                                     batch_size=batch_size, progress=False)
        verdicts = judge.classify(decode_images(model, tokens))
        shape_rate[shape] = sum(v["shape"] == shape for v in verdicts) / len(verdicts)
        colour_rate[shape] = sum(v["colour"] in p.split() for v, p in zip(verdicts, prompts)) / len(verdicts)
        if on_shape is not None:
            on_shape(shape)
    return ShapeRates(shape_rate, colour_rate, n_per_shape)


def rates_table(before: ShapeRates, after: ShapeRates | None = None, concept: str | None = None) -> str:
    header = "| shape | drawn as asked, before |" + (" after | change |" if after else "")
    lines = [header, "| --- | ---: |" + (" ---: | ---: |" if after else "")]
    for shape, rate in before.shape.items():
        name = f"{shape} (erased)" if shape == concept else shape
        row = f"| {name} | {100 * rate:.0f}% |"
        if after:
            row += f" {100 * after.shape[shape]:.0f}% | {100 * (after.shape[shape] - rate):+.0f} |"
        lines.append(row)
    return "\n".join(lines)


# ---------------------------------------------------------------- build and check


def build_world(out: str | Path, *, quick: bool = False, force: bool = False, progress: bool = True,
                vq_config=None, generator_config=None, judge_config=None) -> Path:
    """Train the VQ tokenizer, the generator and the judge into `out` (quick: a tiny budget, for tests).

    Everything is written into a temporary folder beside `out` and renamed into place at the end,
    so an interrupted build leaves no half-written world (and an existing one untouched).
    """
    from .checkpoint import check_replaceable, check_writable, write_folder_atomically
    from .world_judge import JudgeConfig, train_judge
    from .world_model import GeneratorConfig, VQConfig, build_generator, vq_roundtrip

    out = Path(out)
    check_replaceable(out, force=force, kind="shapesworld", what="world folder", legacy=legacy_world_names)
    check_writable(out, "world folder")  # before minutes of training
    vq_config, generator_config = vq_config or VQConfig(), generator_config or GeneratorConfig()
    judge_config = judge_config or JudgeConfig()
    if quick:
        vq_config, generator_config, judge_config = quick_configs(vq_config, generator_config, judge_config)

    def write_into(folder: Path) -> None:
        started = time.perf_counter()
        build_generator(folder / "generator", vq_config=vq_config, generator_config=generator_config,
                        progress=progress)
        generator_seconds = time.perf_counter() - started
        vq = load_vq(folder / "generator")
        judge = train_judge(judge_config, progress=progress, roundtrip=lambda pixels: vq_roundtrip(vq, pixels))
        judge.save(folder / "judge")
        record = {"quick": quick, "seconds": round(time.perf_counter() - started, 1),
                  "generator_seconds": round(generator_seconds, 1),
                  "judge_seconds": round(time.perf_counter() - started - generator_seconds, 1)}
        (folder / "world.json").write_text(json.dumps(record, indent=1) + "\n")

    write_folder_atomically(out, write_into, force=force, kind="shapesworld", what="world folder",
                            legacy=legacy_world_names)
    return out


def legacy_world_names(folder: Path) -> set[str] | None:
    """A world built before manifests existed: it has world.json, and a world holds three things."""
    return {"generator", "judge", "world.json"} if (folder / "world.json").is_file() else None


def load_vq(generator: str | Path):
    """The VQ image tokenizer inside a generator folder (JanusVQVAE, eval mode, fp32)."""
    from transformers import JanusForConditionalGeneration

    return JanusForConditionalGeneration.from_pretrained(generator).model.vqmodel.float().eval()


def quick_configs(vq_config, generator_config, judge_config):
    """The same pipeline at a budget of seconds: for tests of the plumbing, not of quality."""
    import dataclasses

    from .world_model import tiny_budget

    vq_config, generator_config = tiny_budget()
    judge_config = dataclasses.replace(judge_config, n_train_images=64, steps=3, batch_size=32, warmup_steps=1)
    return vq_config, generator_config, judge_config


def check_world(world_folder: str | Path | None = None, *, n_per_shape: int = 100, judge_images: int = 1000,
                seed: int = 12345, guidance_scale: float | None = None, progress: bool = True) -> dict:
    """The measured quality of a world: judge accuracy on held-out renders, generator rates by the
    judge. Minutes at the defaults: a progress bar (stderr) ticks per stage and per shape."""
    from tqdm.auto import tqdm

    from .model import load_janus

    for name, value in (("n_per_shape", n_per_shape), ("judge_images", judge_images)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    world_folder = Path(world_folder or default_world())
    bar = tqdm(total=2 + len(world.SHAPES), desc="world check", unit="stage", disable=not progress)
    try:
        bar.set_postfix_str(f"judge on {judge_images} renders")
        judge = load_judge(world_folder)
        accuracy = judge.accuracy(n=judge_images, seed=seed)
        bar.update(1)
        bar.set_postfix_str(f"judge on {judge_images} VQ round trips")
        model, tokenizer = load_janus(generator_folder(world_folder), device="cpu")
        roundtrip_accuracy = judge_roundtrip_accuracy(judge, model.model.vqmodel, n=judge_images, seed=seed + 1)
        bar.update(1)
        bar.set_postfix_str(f"generator, {n_per_shape} images of {world.SHAPES[0]}")

        def next_shape(shape: str) -> None:
            bar.update(1)
            following = world.SHAPES.index(shape) + 1
            if following < len(world.SHAPES):
                bar.set_postfix_str(f"generator, {n_per_shape} images of {world.SHAPES[following]}")

        rates = shape_rates(model, tokenizer, judge, n_per_shape=n_per_shape, seed=seed,
                            guidance_scale=guidance_scale, on_shape=next_shape)
    finally:
        bar.close()
    return {"judge_accuracy": accuracy, "judge_roundtrip_accuracy": roundtrip_accuracy, "judge_images": judge_images,
            "generator_shape_rate": rates.shape,
            "generator_colour_rate": rates.colour, "prompts": n_per_shape * len(rates.shape),
            "mean_shape_rate": sum(rates.shape.values()) / len(rates.shape),
            "mean_colour_rate": sum(rates.colour.values()) / len(rates.colour)}


def judge_roundtrip_accuracy(judge, vq, n: int, seed: int) -> dict[str, float]:
    """The judge on held-out renders after a VQ round trip: the best it can do on generated images."""
    from .world_model import roundtrip_images

    images, _, scenes = world.make_dataset(n, seed, judge.config.image_size)
    judged = judge.classify(roundtrip_images(vq, images))
    return {attribute: sum(j[attribute] == getattr(s, attribute) for j, s in zip(judged, scenes)) / n
            for attribute in ("shape", "colour")}


def format_check(report: dict) -> str:
    """`earkit world check`'s table: what the judge gets right, and what the generator draws."""
    accuracy = report["judge_accuracy"]
    lines = [f"judge, on {report['judge_images']} freshly rendered held-out images: shape {100 * accuracy['shape']:.1f}% "
             f"right, colour {100 * accuracy['colour']:.1f}% right",
             f"judge, on {report['judge_images']} more after a round trip through the generator's VQ tokenizer: shape "
             f"{100 * report['judge_roundtrip_accuracy']['shape']:.1f}%, colour "
             f"{100 * report['judge_roundtrip_accuracy']['colour']:.1f}%",
             f"generator, {report['prompts']} prompts ({report['prompts'] // len(report['generator_shape_rate'])} per "
             "shape), as the judge sees its images:", "",
             "| shape asked for | drawn as that shape | in the colour asked |", "| --- | ---: | ---: |"]
    for shape, rate in report["generator_shape_rate"].items():
        lines.append(f"| {shape} | {100 * rate:.1f}% | {100 * report['generator_colour_rate'][shape]:.1f}% |")
    lines.append(f"| all | {100 * report['mean_shape_rate']:.1f}% | {100 * report['mean_colour_rate']:.1f}% |")
    return "\n".join(lines)


# ---------------------------------------------------------------- the default erasure

# The engine's defaults, except what a 64-token world needs: one window of 48 would gate most of
# a 64-token image at once, so W = 16; ShapesWorld's own sampling; a smaller push (eta 0.5) over
# more epochs; and the other four shapes as preserve prompts, weighted 30. Measured on a build of
# the shipped recipe (100 prompts per shape; circle before 94%, the others 95-99%):
#   no preservation, eta 1, lr 3e-5 x 8 epochs: circle 40%, the others -10 to -35 points
#   preserve 10, lr 1e-4 x 8:                   circle 12%, cross -20, square -12
#   preserve 30, lr 1e-4 x 8, eta 1 / 0.5 / 0:   circle 20% / 20% / 30%; worst other -15 / -5 / -2
#   preserve 30, lr 2e-4 x 8, eta 0.5 / 0:       circle 14% / 14%; worst other -14 / -2
#   preserve 30, lr 1e-4 x 16, eta 0.5:          circle 0%, the others -2 to +3 (this default)
SHAPESWORLD_ERASE = dict(window=16, epochs=16, batch_size=4, lr=1e-4, eta=0.5, preserve_weight=30.0,
                         guidance_scale=GUIDANCE_SCALE, temperature=TEMPERATURE)


def erase_and_evaluate(out: str | Path = "erased", concept: str = DEFAULT_CONCEPT, anchor: str = DEFAULT_ANCHOR, *,
                       seed: int = 0, force: bool = False, resume: bool = False, n_per_shape: int = 100,
                       eval_seed: int = 2024, progress: bool = True, world_folder: str | Path | None = None,
                       **overrides) -> str:
    """Erase `concept` from the shipped world and measure every shape's rate before and after.

    `overrides` are EraseConfig fields that replace the ShapesWorld defaults (SHAPESWORLD_ERASE,
    device cpu): the same validation as any erasure, before any model loads. `resume` continues a
    killed run in `out` from its checkpoint (the before/after measurement is drawn again: it is
    a function of eval_seed alone).
    """
    from .checkpoint import apply_trainable, check_writable, load_checkpoint
    from .model import load_janus
    from .pairs import same_text, write_text_atomic
    from .trainer import EraseConfig, check_run_folder, erase

    if concept not in world.SHAPES or anchor not in world.SHAPES:
        raise ValueError(f"concept and anchor must be ShapesWorld shapes {world.SHAPES}, got {concept!r}, {anchor!r}")
    if same_text(concept, anchor):
        raise ValueError(f"concept and anchor are the same ({concept!r}): the anchor must be what the model draws "
                         "instead of the concept")
    fixed = ("model", "out", "concept", "anchor", "seed", "force", "resume", "pairs", "preserve")
    taken = sorted(name for name in overrides if name in fixed)
    if taken:
        raise ValueError(f"erase_and_evaluate sets {', '.join(taken)} itself (pass them as its own arguments)")
    settings = {**SHAPESWORLD_ERASE, "device": "cpu", **overrides}
    config = EraseConfig(model=str(generator_folder(world_folder)), out=str(out), concept=concept, anchor=anchor,
                         seed=seed, force=force, resume=resume, **settings)
    config.validate()
    if isinstance(n_per_shape, bool) or not isinstance(n_per_shape, int) or n_per_shape < 1:
        raise ValueError(f"n_per_shape must be an integer >= 1, got {n_per_shape!r}")
    out = Path(out)
    if not resume:
        check_run_folder(out, force)  # before the first measurement, not after it
    check_writable(out, "output folder")
    started = time.perf_counter()
    judge = load_judge(world_folder)
    model, tokenizer = load_janus(config.model, device=config.device, dtype=config.dtype)
    before = shape_rates(model, tokenizer, judge, n_per_shape=n_per_shape, seed=eval_seed)
    result = erase(config, pairs=erasure_pairs(concept, anchor, seed), preserve=preserve_prompts(concept, seed),
                   progress=progress)
    apply_trainable(model, load_checkpoint(result.checkpoint).tensors)
    after = shape_rates(model, tokenizer, judge, n_per_shape=n_per_shape, seed=eval_seed)
    seconds = time.perf_counter() - started
    evaluation = {"concept": concept, "anchor": anchor, "before": before.shape, "after": after.shape,
                  "colour_before": before.colour, "colour_after": after.colour, "n_per_shape": n_per_shape,
                  "erase_seconds": result.seconds, "total_seconds": seconds, "config": config.to_json()}
    write_text_atomic(out / "evaluation.json", json.dumps(evaluation, indent=1) + "\n")
    return (f"ShapesWorld: erased {concept!r} (-> {anchor!r}) in {result.steps} steps, {result.seconds:.0f} s of "
            f"training, {seconds:.0f} s in all; share of {n_per_shape} images per shape that the judge sees "
            f"drawn as asked:\n\n{rates_table(before, after, concept)}\n\ncheckpoint: {result.checkpoint}")
