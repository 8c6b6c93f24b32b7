"""The default erasure: erase a shape from a world and measure every shape before and after
(`earkit erase` with no arguments)."""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

from . import render as world
from . import (DEFAULT_ANCHOR, DEFAULT_CONCEPT, EVAL_TEMPLATES, GUIDANCE_SCALE, PAIR_TEMPLATES, TEMPERATURE,
               generator_folder, load_judge)


def shape_list(shapes) -> list[str]:
    """One shape or several, as a list."""
    return [shapes] if isinstance(shapes, str) else list(shapes)


def default_anchor(concepts) -> str:
    """What an erased shape is drawn as by default: square, or (square being erased) the first
    shape in the world's order that is not."""
    concepts = shape_list(concepts)
    return DEFAULT_ANCHOR if DEFAULT_ANCHOR not in concepts else next(s for s in world.SHAPES if s not in concepts)


def erasure_pairs(concept: str = DEFAULT_CONCEPT, anchor: str = DEFAULT_ANCHOR, seed: int = 0):
    """Concept/anchor prompt pairs in ShapesWorld's own words: every colour, several templates."""
    from ..pair_files import PromptPair

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
    """Prompts of every other shape (every shape not erased, for several concepts), in the pair
    templates and every colour: what the erasure must keep drawing (the trainer's `preserve`).
    Evaluation draws other images (other seeds) from prompts of its own templates, two of which
    these share: the world has few ways to say it."""
    erased = shape_list(concept)
    rng = random.Random(seed)
    return [template.format(shape=shape, colour=colour, size=rng.choice(list(world.SIZES)),
                            background=rng.choice(list(world.BACKGROUNDS)))
            for shape in world.SHAPES if shape not in erased for colour in world.COLOURS for template in PAIR_TEMPLATES]


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
    from ..sampler import decode_images, derived_seed, sample_image_tokens

    shape_rate, colour_rate = {}, {}
    for index, shape in enumerate(shapes):
        prompts = evaluation_prompts(shape, n_per_shape, seed)
        # each image its own seed: shapes share none, and a shape's images do not depend on the others asked for
        shape_index = world.SHAPES.index(shape) if shape in world.SHAPES else index
        tokens = sample_image_tokens(model, tokenizer, prompts, guidance_scale=guidance_scale or GUIDANCE_SCALE,
                                     temperature=temperature or TEMPERATURE,
                                     seeds=[derived_seed(seed, shape_index, i) for i in range(len(prompts))],
                                     batch_size=batch_size, progress=False)
        verdicts = judge.classify(decode_images(model, tokens))
        shape_rate[shape] = sum(v["shape"] == shape for v in verdicts) / len(verdicts)
        colour_rate[shape] = sum(v["colour"] in p.split() for v, p in zip(verdicts, prompts)) / len(verdicts)
        if on_shape is not None:
            on_shape(shape)
    return ShapeRates(shape_rate, colour_rate, n_per_shape)


def rates_table(before: ShapeRates, after: ShapeRates | None = None, concept=None) -> str:
    """The markdown table of every shape's rate; `concept`: the erased shape, or several."""
    erased = shape_list(concept) if concept is not None else []
    header = "| shape | drawn as asked, before |" + (" after | change |" if after else "")
    lines = [header, "| --- | ---: |" + (" ---: | ---: |" if after else "")]
    for shape, rate in before.shape.items():
        name = f"{shape} (erased)" if shape in erased else shape
        row = f"| {name} | {100 * rate:.0f}% |"
        if after:
            row += f" {100 * after.shape[shape]:.0f}% | {100 * (after.shape[shape] - rate):+.0f} |"
        lines.append(row)
    return "\n".join(lines)



#   preserve 30, lr 2e-4 x 8, eta 0.5 / 0:       circle 14% / 14%; worst other -14 / -2
#   preserve 30, lr 1e-4 x 16, eta 0.5:          circle 0%, the others -2 to +3 (this default)
#   the same once every image had a seed of its own (training rows and evaluation images alike):
#                                                 circle 94% -> 7%, the others -4 to +3
SHAPESWORLD_ERASE = dict(window=16, epochs=16, batch_size=4, lr=1e-4, eta=0.5, preserve_weight=30.0,
                         guidance_scale=GUIDANCE_SCALE, temperature=TEMPERATURE)
# LoRA starts at the base model (B = 0) and its update is rank-limited: at the full run's 1e-4 it
# barely moves in 128 steps. At 1e-3 (50 images a shape, eval seed 2024): rank 4 circle 94% -> 4%,
# the others -10 to +6; rank 16 circle 4%, the others -2 to +4 (README, "Erasures as adapters").
SHAPESWORLD_LORA_LR = 1e-3


@dataclass
class ShapesWorldErasure:
    """An erasure of the shipped world and its measurement: `before` and `after` are None on the
    ranks of a torchrun job other than rank 0, which alone measures."""

    concept: str | tuple[str, ...]  # several when one run erased several shapes
    anchor: str | tuple[str, ...]
    result: object  # the trainer's EraseResult
    before: ShapeRates | None
    after: ShapeRates | None
    seconds: float

    def erased(self) -> str:
        """'circle' (-> 'square'), or each of several concepts with its anchor."""
        from ..trainer import concept_anchor_pairs

        return " and ".join(f"{concept!r} (-> {anchor!r})"
                            for concept, anchor in concept_anchor_pairs(self.concept, self.anchor))

    def report(self) -> str:
        """The before/after table, as `earkit erase` prints it."""
        if self.before is None or self.after is None:
            return f"ShapesWorld: erased {self.erased()} in {self.result.steps} steps (rank 0 measures it)"
        return (f"ShapesWorld: erased {self.erased()} in {self.result.steps} steps, "
                f"{self.result.seconds:.0f} s of training, {self.seconds:.0f} s in all; share of "
                f"{self.before.n_per_shape} images per shape that the judge sees drawn as asked:\n\n"
                f"{rates_table(self.before, self.after, self.concept)}\n\ncheckpoint: {self.result.checkpoint}")

    def line(self) -> str:
        """One line: the erased shape's rate before and after, and how far the others moved."""
        erased = shape_list(self.concept)
        anchors = shape_list(self.anchor)
        head = f"{'+'.join(erased)} -> {'+'.join(anchors)}: {self.result.steps} steps, checkpoint {self.result.checkpoint}"
        if self.before is None or self.after is None:
            return head
        moves = [100 * (self.after.shape[shape] - rate) for shape, rate in self.before.shape.items()
                 if shape not in erased]
        rates = ", ".join(f"{concept} drawn as asked {100 * self.before.shape[concept]:.0f}% -> "
                          f"{100 * self.after.shape[concept]:.0f}%" for concept in erased)
        return f"{head}; {rates}, the other shapes {min(moves):+.0f} to {max(moves):+.0f} points"


def erase_and_evaluate(out: str | Path = "erased", concept: str = DEFAULT_CONCEPT, anchor: str = DEFAULT_ANCHOR, *,
                       seed: int = 0, force: bool = False, resume: bool = False, n_per_shape: int = 100,
                       eval_seed: int = 2024, progress: bool = True, world_folder: str | Path | None = None,
                       **overrides) -> str:
    """Erase `concept` from the shipped world and measure every shape's rate before and after;
    returns the report (erase_and_measure's, as text).

    `overrides` are EraseConfig fields that replace the ShapesWorld defaults (SHAPESWORLD_ERASE,
    device cpu): the same validation as any erasure, before any model loads. `resume` continues a
    killed run in `out` from its checkpoint (the before/after measurement is drawn again: it is
    a function of eval_seed alone).
    """
    return erase_and_measure(out, concept, anchor, seed=seed, force=force, resume=resume, n_per_shape=n_per_shape,
                             eval_seed=eval_seed, progress=progress, world_folder=world_folder, **overrides).report()


def erase_and_measure(out: str | Path = "erased", concept: str = DEFAULT_CONCEPT, anchor: str = DEFAULT_ANCHOR, *,
                      seed: int = 0, force: bool = False, resume: bool = False, n_per_shape: int = 100,
                      eval_seed: int = 2024, progress: bool = True, world_folder: str | Path | None = None,
                      **overrides) -> ShapesWorldErasure:
    """erase_and_evaluate's work, its numbers as a ShapesWorldErasure.

    Under torchrun (a process group up) every rank trains (the trainer shares each step's rows out)
    and rank 0 alone measures, after the training, the base model and the erased one, and writes
    evaluation.json: the other ranks are done when the training is.
    """
    from ..checkpoint import apply_trainable, erasure_tensors
    from ..model import load_janus
    from earkit.io import write_text_atomic
    from ..pair_files import same_text
    from .. import distributed
    from ..trainer import EraseConfig, concept_anchor_pairs, erase

    concept = concept if isinstance(concept, str) or len(concept) != 1 else concept[0]
    concept, anchor = (value if isinstance(value, str) else tuple(value) for value in (concept, anchor))
    pairs = concept_anchor_pairs(concept, anchor)  # ValueError: a count that does not fit, a concept twice
    concepts = [one for one, _ in pairs]
    for one, other in pairs:
        if one not in world.SHAPES or other not in world.SHAPES:
            raise ValueError(f"concept and anchor must be ShapesWorld shapes {world.SHAPES}, got {one!r}, {other!r}")
        if same_text(one, other):
            raise ValueError(f"concept and anchor are the same ({one!r}): the anchor must be what the model draws "
                             "instead of the concept")
        if other in concepts:
            raise ValueError(f"anchor {other!r} is erased too: an anchor must be a shape the model keeps drawing")
    fixed = ("model", "out", "concept", "anchor", "seed", "force", "resume", "pairs", "preserve")
    taken = sorted(name for name in overrides if name in fixed)
    if taken:
        raise ValueError(f"erase_and_evaluate sets {', '.join(taken)} itself (pass them as its own arguments)")
    settings = {**SHAPESWORLD_ERASE, "device": "cpu", **overrides}
    if overrides.get("adapter") is not None and "lr" not in overrides:
        settings["lr"] = SHAPESWORLD_LORA_LR
    config = EraseConfig(model=str(generator_folder(world_folder)), out=str(out), concept=concept, anchor=anchor,
                         seed=seed, force=force, resume=resume, **settings)
    config.validate()
    if isinstance(n_per_shape, bool) or not isinstance(n_per_shape, int) or n_per_shape < 1:
        raise ValueError(f"n_per_shape must be an integer >= 1, got {n_per_shape!r}")
    out = Path(out)
    started = time.perf_counter()
    # The trainer checks the output folder (or the checkpoint it resumes) before anything loads;
    # the measurement comes after the training, so that no rank waits on rank 0 measuring.
    result = erase(config, pairs=[pair for one, other in pairs for pair in erasure_pairs(one, other, seed)],
                   preserve=preserve_prompts(concepts, seed),
                   progress=progress)
    if not distributed.current().main:
        return ShapesWorldErasure(concept, anchor, result, None, None, time.perf_counter() - started)
    judge = load_judge(world_folder)
    model, tokenizer = load_janus(config.model, device=config.device, dtype=config.dtype)
    before = shape_rates(model, tokenizer, judge, n_per_shape=n_per_shape, seed=eval_seed)
    apply_trainable(model, erasure_tensors(model, result.checkpoint))  # an adapter run's: merged
    after = shape_rates(model, tokenizer, judge, n_per_shape=n_per_shape, seed=eval_seed)
    seconds = time.perf_counter() - started
    evaluation = {"concept": concept, "anchor": anchor, "before": before.shape, "after": after.shape,
                  "colour_before": before.colour, "colour_after": after.colour, "n_per_shape": n_per_shape,
                  "erase_seconds": result.seconds, "total_seconds": seconds, "config": config.to_json()}
    write_text_atomic(out / "evaluation.json", json.dumps(evaluation, indent=1) + "\n")
    return ShapesWorldErasure(concept, anchor, result, before, after, seconds)
