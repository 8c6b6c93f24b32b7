"""ShapesWorld, the embedded default: build it, check it, and erase a shape from it.

    earkit world build --out DIR     # VQ tokenizer + tiny Janus generator + open_clip judge
    earkit world check [--world DIR] # judge accuracy, and how often the generator draws what is asked
    earkit erase                     # no arguments: erase "circle" (-> "square") from the shipped world

A built world is a folder with `generator/` (a JanusForConditionalGeneration folder with its
tokenizer: what `--model` points at), `judge/` (the open_clip judge) and `world.json`. The one
shipped inside the package (`engine/shapesworld/weights/`) is what every command uses when no model is
given, so nothing is built or downloaded at first run.

The package, one story per file: `render` draws the scenes and their captions, `generator` trains
the VQ tokenizer and the tiny Janus generator, `judge` trains the open_clip judge, `build` builds
and checks a world, `erase` is the default erasure measured before and after.
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_WORLD = Path(__file__).resolve().parent / "weights"
DEFAULT_CONCEPT, DEFAULT_ANCHOR = "circle", "square"
EVAL_TEMPLATES = ("a {colour} {shape}", "a photo of a {colour} {shape}", "a picture of a {size} {colour} {shape}")
# ShapesWorld's sampling: the generator folder's generation_config.json states it (why these
# two: generator.py, set_sampling); the default erasure reads them here.
GUIDANCE_SCALE = 1.5
TEMPERATURE = 0.5
# The judge a world's generator names as its own (its earkit.json), relative to the generator folder.
DEFAULT_JUDGE = "shapesworld:../judge"
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
    from .judge import WorldJudge

    return WorldJudge.load(judge_folder(world_folder))


from .build import build_world, check_world, format_check  # noqa: E402
from .erase import SHAPESWORLD_ERASE, erase_and_evaluate, erasure_pairs, preserve_prompts, rates_table, shape_rates  # noqa: E402

__all__ = ["DEFAULT_WORLD", "DEFAULT_CONCEPT", "DEFAULT_ANCHOR", "GUIDANCE_SCALE", "TEMPERATURE", "default_world",
           "generator_folder", "judge_folder", "load_judge", "build_world", "check_world", "format_check",
           "SHAPESWORLD_ERASE", "erase_and_evaluate", "erasure_pairs", "preserve_prompts", "rates_table", "shape_rates"]
