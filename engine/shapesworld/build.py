"""Build a world (VQ tokenizer, generator, judge) and check what it can do (`earkit world build|check`)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from . import render as world
from . import DEFAULT_JUDGE, default_world, generator_folder, load_judge
from .erase import shape_rates




def build_world(out: str | Path, *, quick: bool = False, force: bool = False, progress: bool = True,
                vq_config=None, generator_config=None, judge_config=None) -> Path:
    """Train the VQ tokenizer, the generator and the judge into `out` (quick: a tiny budget, for tests).

    Everything is written into a temporary folder beside `out` and renamed into place at the end,
    so an interrupted build leaves no half-written world (and an existing one untouched).
    """
    from earkit.io import check_replaceable, check_writable, write_folder_atomically
    from .judge import JudgeConfig, train_judge
    from .generator import GeneratorConfig, VQConfig, build_generator, vq_roundtrip

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
                        progress=progress, default_judge=DEFAULT_JUDGE)
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

    from .generator import tiny_budget

    vq_config, generator_config = tiny_budget()
    judge_config = dataclasses.replace(judge_config, n_train_images=64, steps=3, batch_size=32, warmup_steps=1)
    return vq_config, generator_config, judge_config


def check_world(world_folder: str | Path | None = None, *, n_per_shape: int = 100, judge_images: int = 1000,
                seed: int = 12345, guidance_scale: float | None = None, progress: bool = True) -> dict:
    """The measured quality of a world: judge accuracy on held-out renders, generator rates by the
    judge. Minutes at the defaults: a progress bar (stderr) ticks per stage and per shape."""
    from tqdm.auto import tqdm

    from ..model import load_janus

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
    from .generator import roundtrip_images

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
