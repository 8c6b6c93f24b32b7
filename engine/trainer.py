"""Erase a concept from Janus: EAR's fine-tuning with Windowed Gradient Accumulation and
Thresholded Loss Masking, teacher-forced (DESIGN.md, "The method", steps 1-6).

    from earkit.engine import EraseConfig, erase
    result = erase(EraseConfig(model="deepseek-community/Janus-Pro-7B", concept="church", anchor="cinema"))

One step, for a batch of (concept prompt, anchor prompt) pairs:
  1. the frozen teacher samples image tokens x under the concept prompt, with CFG;
  2. the teacher scores x under the concept and the anchor prompt (one teacher-forced pass each);
  3. the student (the same model, its trainable modules swapped in) scores x under the concept;
  4-6. the objective (token-kl through the fused kernel, or hidden-mse) with the token threshold
     and the window gate; `parallel` WGA backpropagates all windows at once and steps once,
     `sequential` steps once per window, as the paper does.
Optionally (`preserve`, not in the paper) each step also samples images of prompts that must
not change and adds `preserve_weight` times the same objective with the teacher's own prediction
as the target (a pair whose concept and anchor are one prompt: (1 + eta) z - eta z = z), under
the same threshold and gate, so it only acts on tokens that have drifted past them.
The teacher is not a second model: only the trainable tensors are kept twice, and swapped.
With `adapter="lora"` (engine/adapters.py) LoRA pairs on the same modules train instead of their
weights, the teacher is the model with its adapter switched off, and the checkpoint folder is
also the PEFT adapter folder. `concept` may name several concepts: one run over all their pairs.

Everything that decides a step (the pair order, each image's seed) is a function of the run's
seed, the step number and the image's row in the step's batch, and checkpoints hold the trainable
tensors, the optimizer state and the step, so a killed run resumed with `resume=True` ends
bit-for-bit where an uninterrupted one would.

Under torchrun (engine/distributed.py: a process group is up) the rows of each step are shared
out: every rank takes a contiguous slice (shard_rows), samples and scores its own rows, and the
ranks add up what the one-process loss divides by (the kept weight sums) before they scale their
losses, and their gradients (one flattened all-reduce) before the identical clip and optimizer
step on every rank. A run therefore trains to the same weights at any world size (to float
rounding), and a row's image does not depend on which rank drew it (its seed is
derived_seed(seed, step, stream, row)). Rank 0 alone writes the checkpoint and metrics.json and
shows progress; a resume reads the checkpoint on rank 0 and hands it to the others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from . import distributed, objectives
from earkit.io import check_writable, first_line, foreign_files, json_digest, some_of
from .checkpoint import OPTIMIZER_FILE, STATE_FILE, apply_trainable, legacy_checkpoint_names, load_checkpoint, save_checkpoint
from .adapters import ADAPTERS, AdapterOff, attach_lora, import_peft, write_adapter_files
from .model import (check_device, check_model_source, encode_prompts, image_hidden_states, image_token_count,
                    load_janus, resolve_dtype)
from earkit.io import write_text_atomic
from .pair_files import PromptPair, load_pairs, load_prompts, pairs_from_concept
from .sampler import derived_seed, sample_image_tokens

OPTIMIZERS = ("adamw8bit", "paged-adamw8bit", "adamw")
# Fields a resumed run may change: where it runs and how often it saves, how long it runs (more
# steps continue the same schedule), and the paths of its prompt files (their contents are
# compared instead, by data_fingerprint). Every other field decides the trajectory, so a resume
# with another value (another lr, seed, window...) is refused by name.
RESUME_MAY_CHANGE = ("out", "device", "dtype", "save_every", "resume", "force", "gradient_checkpointing",
                     "epochs", "steps", "pairs", "preserve")
# What an erasure run writes into its output folder (the default ShapesWorld erasure adds
# evaluation.json); --force starts over only in a folder that holds nothing else.
RUN_FILES = ("checkpoint", "metrics.json", "evaluation.json")
WGA_MODES = ("parallel", "sequential")
DEFAULT_TRAINABLE = ("model.language_model.layers.[0-4].self_attn.*",)


@dataclass
class EraseConfig:
    """Everything one erasure run needs; `earkit erase --help` documents the same fields."""

    # Each field's metadata is the help of its `earkit erase` flag (earkit/cli/arguments.py
    # derives the flags from them); "none" says what None means where "none" may be given.
    model: str
    out: str = "erased"
    # Several concepts erase in one run: a tuple of concepts, with one anchor for all or one each.
    concept: str | tuple[str, ...] | None = field(default=None, metadata={
        "help": "the concept to erase, e.g. church; repeat it to erase several in one run"})
    anchor: str | tuple[str, ...] | None = field(default=None, metadata={
        "help": "what to draw instead, e.g. cinema: one for every concept, or one per --concept, in order"})
    pairs: str | None = field(default=None, metadata={
        "help": "prompt pairs file (JSONL with concept_prompt/anchor_prompt, or a released EAR train file)"})
    preserve: str | None = field(default=None, metadata={
        "help": "prompts whose images must not change (one per line in a .txt, records with a 'prompt', or a "
                "pairs file, whose anchor prompts are read); not in the EAR paper"})  # pairs.load_prompts
    preserve_weight: float = field(default=1.0, metadata={
        "help": "weight of the preservation term beside the erasure loss"})
    objective: str = field(default="token-kl", metadata={
        "help": "the training loss: token-kl (earkit's) or hidden-mse (the released EAR code's)",
        "choices": objectives.OBJECTIVES})
    eta: float = field(default=1.0, metadata={"help": "negative-guidance strength"})
    window: int = field(default=48, metadata={  # the released code: 48 (church), 100 (nudity), 12 (style)
        "help": "WGA window, in image tokens"})
    token_threshold: float | None = field(default=None, metadata={
        "help": "TLM: drop tokens whose loss is <= this", "none": "keep every token"})
    window_threshold: float | None = field(default=None, metadata={
        "help": "TLM: drop windows whose kept loss sum is <= this",
        "none": "0.05 with hidden-mse, as the released code; no threshold with token-kl"})
    wga: str = field(default="parallel", metadata={
        "help": "parallel: one step per batch; sequential: one step per window", "choices": WGA_MODES})
    trainable: tuple[str, ...] = field(default=DEFAULT_TRAINABLE, metadata={
        "help": "glob of parameter names to train; repeatable"})
    optimizer: str = field(default="adamw8bit", metadata={
        "help": "the optimizer (the 8-bit ones use bitsandbytes)", "choices": OPTIMIZERS})
    lr: float = field(default=1e-4, metadata={"help": "learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "the optimizer's weight decay"})
    epochs: int = field(default=1, metadata={"help": "passes over the prompt pairs"})
    steps: int | None = field(default=None, metadata={"help": "number of steps (overrides --epochs)"})
    batch_size: int = field(default=1, metadata={"help": "prompt pairs per step"})
    images_per_prompt: int = field(default=1, metadata={"help": "images sampled per prompt pair and step"})
    grad_clip: float | None = field(default=1.0, metadata={
        "help": "clip the gradient norm to this", "none": "no clipping"})
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute activations in the backward pass: less memory, more time"})
    # None: the model's own (its generation_config.json), as the sampler takes it anywhere else
    guidance_scale: float | None = field(default=None, metadata={
        "help": "CFG scale of the sampled training images", "default": "the model's generation_config.json, else 5"})
    temperature: float | None = field(default=None, metadata={
        "help": "sampling temperature of the training images",
        "default": "the model's generation_config.json, else 1"})
    robust: bool = field(default=False, metadata={
        "help": "adversarial erasure (AdvUnlearn-style, not in the EAR paper): each step a white-box attack on the "
                "current model finds prompt tokens that bring the concept back, and the step also trains on them"})
    robust_tokens: int = field(default=4, metadata={
        "help": "--robust: attack tokens per prompt (before the concept prompt, or after it with the concept "
                "deleted, a step each)"})
    robust_steps: int = field(default=25, metadata={"help": "--robust: attack optimiser steps per training step"})
    adapter: str | None = field(default=None, metadata={
        "help": "lora: train a LoRA adapter (peft) on the Linear modules --trainable names instead of their weights; "
                "the checkpoint folder is then also a PEFT adapter folder (PeftModel.from_pretrained loads it)",
        "choices": ADAPTERS, "default": "none, the weights themselves train"})
    lora_rank: int = field(default=8, metadata={"help": "--adapter lora: the adapters' rank"})
    lora_alpha: float | None = field(default=None, metadata={
        "help": "--adapter lora: the adapters' alpha (their output is scaled by alpha / rank)",
        "default": "twice the rank"})
    lora_dropout: float = field(default=0.0, metadata={"help": "--adapter lora: dropout on the adapters' input"})
    seed: int = field(default=0, metadata={"help": "the run's seed"})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32"})
    device: str | None = field(default=None, metadata={
        "help": "cuda, cuda:1, cpu", "default": "cuda when available; cpu for the ShapesWorld default"})
    load_in_8bit: bool = field(default=False, metadata={"help": "frozen weights in 8 bits (bitsandbytes, CUDA)"})
    save_every: int = field(default=0, metadata={  # steps between rolling checkpoints; 0 = only at the end
        "help": "steps between checkpoints", "default": "0, at the end only"})
    resume: bool = False
    force: bool = False

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""
        def finite(name, value, allow_none=True):
            if value is None and allow_none:
                return
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")

        if self.objective not in objectives.OBJECTIVES:
            raise ValueError(f"objective must be one of {objectives.OBJECTIVES}, got {self.objective!r}")
        if self.wga not in WGA_MODES:
            raise ValueError(f"wga must be one of {WGA_MODES}, got {self.wga!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        for name in ("window", "epochs", "batch_size", "images_per_prompt", "robust_tokens", "robust_steps",
                     "lora_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")
        if not isinstance(self.save_every, int) or self.save_every < 0:
            raise ValueError(f"save_every must be an integer >= 0, got {self.save_every!r}")
        for name in ("eta", "lr", "weight_decay", "preserve_weight"):
            finite(name, getattr(self, name), allow_none=False)
        if self.preserve_weight < 0:
            raise ValueError(f"preserve_weight must be >= 0, got {self.preserve_weight}")
        for name in ("token_threshold", "window_threshold", "grad_clip", "guidance_scale", "temperature"):
            finite(name, getattr(self, name))
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.guidance_scale is not None and self.guidance_scale < 1:
            raise ValueError(f"guidance_scale must be >= 1, got {self.guidance_scale}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be > 0 (or None), got {self.grad_clip}")
        if not self.trainable:
            raise ValueError("trainable must name at least one glob of parameter names")
        if self.pairs is None and (self.concept is None or self.anchor is None):
            raise ValueError("give either pairs (a file) or both concept and anchor")
        if self.pairs is None:
            self.concept_anchors()  # ValueError naming what is wrong with several concepts or anchors
        if self.adapter is not None and self.adapter not in ADAPTERS:
            raise ValueError(f"adapter must be one of {ADAPTERS} (or None), got {self.adapter!r}")
        finite("lora_alpha", self.lora_alpha)
        finite("lora_dropout", self.lora_dropout, allow_none=False)
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.adapter is None:
            set_apart = [name for name in ("lora_rank", "lora_alpha", "lora_dropout")
                         if getattr(self, name) != getattr(EraseConfig, name)]
            if set_apart:
                raise ValueError(f"{set_apart[0]} applies to adapters: add adapter='lora' (--adapter lora), or leave "
                                 f"{set_apart[0]} out")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        resolve_dtype(self.dtype, torch.device("cpu"))  # ValueError naming dtype
        check_device(self.device)

    def effective_window_threshold(self) -> float | None:
        if self.window_threshold is None and self.objective == "hidden-mse":
            return 0.05
        return self.window_threshold

    def effective_lora_alpha(self) -> float:
        return float(2 * self.lora_rank if self.lora_alpha is None else self.lora_alpha)

    def concept_anchors(self) -> list[tuple[str, str]]:
        return concept_anchor_pairs(self.concept, self.anchor)

    def prompt_pairs(self) -> list[PromptPair]:
        if self.pairs is not None:
            return load_pairs(self.pairs)
        return [pair for concept, anchor in self.concept_anchors() for pair in pairs_from_concept(concept, anchor)]

    def preserve_prompts(self) -> list[str]:
        return load_prompts(self.preserve) if self.preserve is not None else []

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["trainable"] = list(self.trainable)
        for name in ("concept", "anchor"):
            if isinstance(data[name], tuple):
                data[name] = list(data[name])
        return data


def concept_anchor_pairs(concept, anchor) -> list[tuple[str, str]]:
    """(concept, anchor) of each concept a run erases: `concept` one string or several, `anchor`
    one for all or one per concept. ValueError naming what does not fit."""
    concepts = [concept] if isinstance(concept, str) else list(concept or ())
    anchors = [anchor] if isinstance(anchor, str) else list(anchor or ())
    if not concepts or not all(isinstance(value, str) for value in concepts + anchors):
        raise ValueError(f"concept must be a string or a list of strings, got {concept!r}")
    if len(anchors) == 1:
        anchors = anchors * len(concepts)
    if len(anchors) != len(concepts):
        raise ValueError(f"{len(anchors)} anchors for {len(concepts)} concepts: give one anchor for all, or one "
                         "per concept")
    seen = set()
    for one in concepts:
        if " ".join(one.split()).casefold() in seen:
            raise ValueError(f"concept {one!r} is given twice")
        seen.add(" ".join(one.split()).casefold())
    return list(zip(concepts, anchors))


@dataclass
class EraseResult:
    out: Path
    checkpoint: Path
    steps: int
    optimizer_steps: int
    losses: list[float] = field(default_factory=list)
    kept_fractions: list[float] = field(default_factory=list)
    preserve_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0


# ---------------------------------------------------------------- trainable modules and the teacher


def select_trainable(model, patterns) -> dict[str, torch.nn.Parameter]:
    """Parameters whose full names match any glob; everything else is frozen."""
    chosen = {}
    for name, parameter in model.named_parameters():
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            chosen[name] = parameter
        parameter.requires_grad_(False)
    if not chosen:
        raise ValueError(f"trainable pattern(s) {list(patterns)} match no parameter of the model "
                         f"(names look like {next(iter(dict(model.named_parameters())))!r})")
    for parameter in chosen.values():
        if not parameter.is_floating_point():
            raise ValueError("trainable parameters must be floating point (8-bit frozen weights cannot be trained)")
        parameter.requires_grad_(True)
    return chosen


def check_trainable_patterns(source: str, patterns, adapter: str | None = None) -> None:
    """Match the globs against the parameter names (with an adapter: the Linear modules) of the
    model's config, built on the meta device (no weights read), so a typo fails in a second
    rather than after loading 14 GB."""
    from transformers import AutoConfig, JanusForConditionalGeneration

    from .adapters import lora_target_modules

    config = AutoConfig.from_pretrained(check_model_source(source))
    with torch.device("meta"):
        skeleton = JanusForConditionalGeneration(config)
    if adapter is not None:
        lora_target_modules(skeleton, patterns)
    else:
        select_trainable(skeleton, patterns)


class FrozenTeacher:
    """A frozen copy of the trainable tensors only; `active()` swaps it into the model's
    parameters (a pointer swap of .data, no copy) and swaps the student back afterwards."""

    def __init__(self, trainable: dict[str, torch.nn.Parameter]):
        self.trainable = trainable
        self.tensors = {name: parameter.detach().clone() for name, parameter in trainable.items()}

    def _swap(self):
        for name, parameter in self.trainable.items():
            parameter.data, self.tensors[name] = self.tensors[name], parameter.data

    @contextlib.contextmanager
    def active(self):
        self._swap()
        try:
            yield
        finally:
            self._swap()


def enable_gradient_checkpointing(model) -> None:
    """Recompute the language model's layer activations in backward (non-reentrant: the inputs
    need no grad). transformers 5.2x renamed the switch; 5.17 has only the old name."""
    language_model = model.model.language_model
    if hasattr(language_model, "activation_checkpointing_enable"):
        language_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    language_model.train()  # transformers only checkpoints in training mode (Llama has no dropout)


def make_optimizer(name: str, parameters, lr: float, weight_decay: float):
    parameters = list(parameters)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    # bitsandbytes' CPU backend warns at import that Hugging Face's optional `kernels` package is absent.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes as bnb
    except ImportError as error:
        raise RuntimeError(f"optimizer {name} needs bitsandbytes ({error}); use --optimizer adamw") from error
    factory = bnb.optim.AdamW8bit if name == "adamw8bit" else bnb.optim.PagedAdamW8bit
    return factory(parameters, lr=lr, weight_decay=weight_decay)


# ---------------------------------------------------------------- the schedule


def steps_per_epoch(n_pairs: int, batch_size: int) -> int:
    return -(-n_pairs // batch_size)


def batch_for_step(pairs: list, step: int, batch_size: int, seed: int) -> list:
    """The pairs (or preserve prompts) of a step: a fresh permutation each epoch, from (seed, epoch) alone."""
    per_epoch = steps_per_epoch(len(pairs), batch_size)
    epoch, index = divmod(step, per_epoch)
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()
    return [pairs[i] for i in order[index * batch_size:(index + 1) * batch_size]]


# The sampling streams of a step: its concept prompts' images, and its preserve prompts'; the
# seed stream of --robust's attack; and the run's generator (LoRA dropout), seeded once.
CONCEPT_STREAM, PRESERVE_STREAM, ROBUST_STREAM, DROPOUT_STREAM = 0, 1, 2, 3


def image_seeds(seed: int, step: int, stream: int, rows) -> list[int]:
    """The seed of each image row of a step: a function of (run seed, step, stream, row) alone,
    `row` counting the step's whole batch (every rank's rows, prompt-major), so an image is the
    same whichever rank draws it."""
    return [derived_seed(seed, step, stream, row) for row in rows]


def shard_rows(count: int, ranks: distributed.Ranks | None = None) -> range:
    """This rank's contiguous slice of a step's `count` rows, split as evenly as possible (the
    first count % world_size ranks take one more); empty on a rank beyond a small batch."""
    ranks = distributed.current() if ranks is None else ranks
    base, extra = divmod(count, ranks.world_size)
    start = ranks.rank * base + min(ranks.rank, extra)
    return range(start, start + base + (1 if ranks.rank < extra else 0))


def windows(n_tokens: int, window: int, mode: str) -> list[tuple[int, int]]:
    """The position ranges backpropagated together: all at once (parallel) or one window at a time."""
    if mode == "parallel":
        return [(0, n_tokens)]
    return [(start, min(start + window, n_tokens)) for start in range(0, n_tokens, window)]


# ---------------------------------------------------------------- one step


@dataclass
class TeacherTargets:
    """What the frozen teacher hands the student for one batch (DESIGN.md steps 1-2)."""

    concept_batch: object  # PromptBatch of the concept prompts (the student's context too)
    tokens: Tensor  # (B, T) image tokens sampled under the concept prompts
    concept: Tensor  # teacher logits (token-kl) or hidden states (hidden-mse) under the concept
    anchor: Tensor  # the same under the anchor prompts


def teacher_pass(model, tokenizer, teacher: FrozenTeacher, prompts: list[str], anchor_prompts: list[str] | None,
                 seeds: list[int], config: EraseConfig) -> TeacherTargets:
    """Steps 1-2: the teacher's image tokens under `prompts` (row i drawn with seeds[i]), and its
    states over them under `prompts` and under `anchor_prompts` (None: `prompts` again, whose
    states then serve as both)."""
    device = next(model.parameters()).device
    batch = encode_prompts(tokenizer, prompts, device)
    with teacher.active(), torch.no_grad():
        tokens = sample_image_tokens(model, tokenizer, prompts, guidance_scale=config.guidance_scale,
                                     temperature=config.temperature, seeds=seeds, progress=False)
        states = [image_hidden_states(model, batch, tokens)]
        if anchor_prompts is not None:
            states.append(image_hidden_states(model, encode_prompts(tokenizer, anchor_prompts, device), tokens))
        if config.objective == "token-kl":
            # The head may be trainable too: the teacher's targets come from the teacher's head
            # (its features when its last Linear is frozen and token-kl runs fused with it).
            states = [objectives.token_kl_teacher(model, hidden) for hidden in states]
    return TeacherTargets(batch, tokens, states[0], states[-1])


def repeated(prompts: list[str], config: EraseConfig) -> list[str]:
    return [prompt for prompt in prompts for _ in range(config.images_per_prompt)]


def teacher_targets(model, tokenizer, teacher: FrozenTeacher, batch: list[PromptPair], step: int,
                    config: EraseConfig, rows: range | None = None) -> TeacherTargets | None:
    """The teacher's images of the concept prompts, scored under the concept and the anchor
    prompts: of the rows `rows` of the step's batch (pairs x images_per_prompt, prompt-major;
    None: every row), or None when `rows` is empty (a rank beyond a small batch). With
    config.robust the rows come twice: as they are, and under the prompts an attack on the
    current model found (adversarial_targets)."""
    concept = repeated([pair.concept_prompt for pair in batch], config)
    anchor = repeated([pair.anchor_prompt for pair in batch], config)
    rows = range(len(concept)) if rows is None else rows
    if not rows:
        return None
    prompts = [concept[row] for row in rows]
    targets = teacher_pass(model, tokenizer, teacher, prompts, [anchor[row] for row in rows],
                           image_seeds(config.seed, step, CONCEPT_STREAM, rows), config)
    if not config.robust:
        return targets
    named = config.concept if isinstance(config.concept, str) else None  # a pair's own concept first
    concepts = repeated([pair.concept or named for pair in batch], config)
    return adversarial_targets(model, tokenizer, targets, prompts, [concepts[row] for row in rows], step, config, rows)


def adversarial_targets(model, tokenizer, targets: TeacherTargets, prompts: list[str], concepts: list, step: int,
                        config: EraseConfig, rows) -> TeacherTargets:
    """--robust (after AdvUnlearn): the white-box attack of engine/attacks.py, run on the current
    student for `robust_steps`, finds `robust_tokens` tokens under which the student gives the
    teacher's image of each concept prompt back; those attacked prompts join the batch as more
    rows with the same image and the same teacher targets, so the student learns to erase under
    them too (the teacher's states stay those of the plain prompt: the target is what the concept
    prompt should give). The attack takes turns, a step each: tokens put before the concept
    prompt (UnlearnDiffAtk's form), and tokens put after the prompt with its concept deleted
    (Ring-A-Bell's form, which names no concept at all); a row whose concept word is unknown
    (a pairs file without it) keeps its prompt whole and gets the tokens after it."""
    from .attacks import soft_prompt_attack, without_concept

    attacked, where = list(prompts), "prefix"
    if step % 2 == 1:
        where = "suffix"
        attacked = [(without_concept(prompt, concept) if concept else "") or prompt
                    for prompt, concept in zip(prompts, concepts)]
    found = soft_prompt_attack(model, tokenizer, attacked, targets.tokens, n_tokens=config.robust_tokens,
                               steps=config.robust_steps, seed=derived_seed(config.seed, step, ROBUST_STREAM),
                               rows=list(rows), batch_size=None, where=where)
    device = targets.tokens.device
    both = encode_prompts(tokenizer, prompts + found.prompts, device)
    return TeacherTargets(both, torch.cat([targets.tokens, targets.tokens]), torch.cat([targets.concept, targets.concept]),
                          torch.cat([targets.anchor, targets.anchor]))


def preserve_targets(model, tokenizer, teacher: FrozenTeacher, prompts: list[str], step: int,
                     config: EraseConfig, rows: range | None = None) -> TeacherTargets | None:
    """The teacher's images of prompts that must not change, and its own prediction over them as
    both "concept" and "anchor": the objective's target is then the teacher's prediction itself.
    `rows` as teacher_targets' (None when empty)."""
    prompts = repeated(prompts, config)
    rows = range(len(prompts)) if rows is None else rows
    if not rows:
        return None
    return teacher_pass(model, tokenizer, teacher, [prompts[row] for row in rows], None,
                        image_seeds(config.seed, step, PRESERVE_STREAM, rows), config)


def window_loss(model, targets: TeacherTargets, start: int, end: int, config: EraseConfig) -> tuple[Tensor, Tensor]:
    """The objective over one window of positions: (loss, per-token weights)."""
    # Positions after `end` do not influence this window: the student pass stops there.
    student_hidden = image_hidden_states(model, targets.concept_batch, targets.tokens[:, :end])[:, start:end]
    window_targets = objectives.TeacherStates(targets.concept[:, start:end], targets.anchor[:, start:end])
    options = dict(eta=config.eta, token_threshold=config.token_threshold, window=config.window,
                   window_threshold=config.effective_window_threshold())
    if config.objective == "token-kl":
        return objectives.token_kl(model, student_hidden, window_targets, **options)
    return objectives.hidden_mse(student_hidden, window_targets, **options)


def all_reduce_gradients(parameters: list, what: str) -> None:
    """Sum the parameters' gradients over the ranks in ONE flattened all-reduce (a rank with no
    rows adds zeros). A parameter no rank has a gradient for keeps none, as in one process, where
    the optimizer then leaves it alone: a flag per parameter rides at the buffer's end."""
    if not distributed.current().sharded:
        return
    wide = torch.float64 if any(parameter.dtype == torch.float64 for parameter in parameters) else torch.float32
    sizes = [parameter.numel() for parameter in parameters]
    total = sum(sizes)
    flat = torch.zeros(total + len(parameters), dtype=wide, device=parameters[0].device)
    offset = 0
    for index, (parameter, size) in enumerate(zip(parameters, sizes)):
        if parameter.grad is not None:
            flat[offset:offset + size] = parameter.grad.reshape(-1).to(flat.device)
            flat[total + index] = 1
        offset += size
    distributed.all_reduce_sum(flat, what)
    present = flat[total:].tolist()
    offset = 0
    for parameter, size, count in zip(parameters, sizes, present):
        parameter.grad = (flat[offset:offset + size].view_as(parameter).to(parameter.device, parameter.dtype)
                          if count else None)
        offset += size


def student_update(model, optimizer, targets: TeacherTargets | None, config: EraseConfig, trainable_parameters,
                   preserve: TeacherTargets | None = None, *, preserving: bool | None = None,
                   step: int | None = None) -> dict:
    """Steps 3-6: the student over the sampled tokens, the objective (plus the preservation term
    over the preserve prompts' tokens, when given), and the optimizer step(s).

    Under torchrun each rank passes the targets of its own rows (None where it has none;
    `preserving`, default `preserve is not None`, says whether the step has a preservation term
    on any rank). Per window the ranks add up their kept weight sums (one small all-reduce), so
    each scales its mean loss to its share of the whole batch's (objectives.shard_scale), and
    then their gradients, so every rank takes the step one process would take on the whole
    batch. The returned numbers are the whole batch's. `step` only names the step in errors."""
    preserving = (preserve is not None if preserving is None else preserving) and config.preserve_weight > 0
    parameters = list(trainable_parameters)
    present = targets if targets is not None else preserve
    n_tokens = present.tokens.shape[1] if present is not None else image_token_count(model)
    where = "" if step is None else f" of step {step + 1}"
    losses, kept, preserve_losses, optimizer_steps = [], [], [], 0
    for start, end in windows(n_tokens, config.window, config.wga):
        optimizer.zero_grad(set_to_none=True)
        terms = []  # (mean loss over this rank's rows, index of the term's sums)
        # per term (erasure, preservation): loss sum, kept weight sum, token count; built on the
        # device and read back once, with the ranks' totals: the window's one host sync
        local = torch.zeros(6, dtype=torch.float64, device=parameters[0].device)
        for index, (term_targets, used) in enumerate(((targets, True), (preserve, preserving))):
            if term_targets is None or not used:
                continue
            loss, weight = window_loss(model, term_targets, start, end, config)
            local[3 * index:3 * index + 3] = objectives.window_sums(loss, weight)
            terms.append((loss, index))
        totals = distributed.all_reduce_sum(local.clone(), f"the kept-token sums of a window{where}")
        local, totals = torch.stack([local, totals]).tolist()
        whole = [objectives.SumOf(*totals[0:3]), objectives.SumOf(*totals[3:6])]
        losses.append(whole[0].mean())
        kept.append(whole[0].kept_fraction())
        weight_sum = whole[0].weight_sum
        if preserving:
            # A fully masked term's mean is 0 (its normaliser is max(1, sum a)): adding it is harmless.
            preserve_losses.append(whole[1].mean())
            weight_sum += whole[1].weight_sum
        if weight_sum == 0.0:
            continue  # every token masked or gated on every rank: nothing to learn, no momentum-only update
        objective = None
        for loss, index in terms:
            part = loss * objectives.shard_scale(local[3 * index + 1], whole[index].weight_sum)
            if index == 1:
                part = config.preserve_weight * part
            objective = part if objective is None else objective + part
        if objective is not None:
            objective.backward()
        all_reduce_gradients(parameters, f"the gradients of a window{where}")
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
        optimizer.step()
        optimizer_steps += 1
    optimizer.zero_grad(set_to_none=True)
    stats = {"loss": sum(losses) / len(losses), "kept": sum(kept) / len(kept), "optimizer_steps": optimizer_steps}
    if preserve_losses:
        stats["preserve_loss"] = sum(preserve_losses) / len(preserve_losses)
    return stats


def train_step(model, tokenizer, teacher: FrozenTeacher, optimizer, batch: list[PromptPair], step: int,
               config: EraseConfig, trainable_parameters, preserve_batch: list[str] | None = None) -> dict:
    """One step over the step's whole batch of pairs (and preserve prompts): under torchrun this
    rank samples and scores its shard_rows of it, and the ranks combine (student_update)."""
    ranks = distributed.current()
    targets = teacher_targets(model, tokenizer, teacher, batch, step, config,
                              shard_rows(len(batch) * config.images_per_prompt, ranks))
    preserving = bool(preserve_batch) and config.preserve_weight > 0
    preserve = None
    if preserving:
        preserve = preserve_targets(model, tokenizer, teacher, preserve_batch, step, config,
                                    shard_rows(len(preserve_batch) * config.images_per_prompt, ranks))
    return student_update(model, optimizer, targets, config, trainable_parameters, preserve, preserving=preserving,
                          step=step)


# ---------------------------------------------------------------- the run


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # rank 0's states, on a rank whose node may have fewer GPUs: those it has
        torch.cuda.set_rng_state_all(list(state["cuda"])[:torch.cuda.device_count()])


class TrainingDiverged(ValueError):
    """The loss went non-finite: the run stops before saving weights that are no longer usable."""


def data_fingerprint(pairs: list[PromptPair], preserve: list[str]) -> dict:
    """What the run trains on, in a few bytes: a resume on other pairs or preserve prompts is refused."""
    return {"pairs": len(pairs), "pairs_sha256": json_digest([[p.concept_prompt, p.anchor_prompt] for p in pairs]),
            "preserve": len(preserve), "preserve_sha256": json_digest(list(preserve))}


def check_resume_config(resumed, config: EraseConfig, data: dict) -> None:
    """ValueError naming the first field of `config` (or the training data) that differs from the
    run being resumed: continuing it with another lr, seed or window would not be that run."""
    saved = resumed.config.get("erase")
    if not isinstance(saved, dict):
        raise ValueError(f"checkpoint {resumed.folder}: its config.json records no erase config to resume")
    now = config.to_json()
    for name, value in now.items():
        if name in RESUME_MAY_CHANGE or name not in saved:
            continue
        if saved[name] != value:
            raise ValueError(f"resume: {name} differs from the checkpoint's ({saved[name]!r} there, {value!r} now); "
                             f"resume with the same {name}, or start a new run in another folder")
    saved_data = resumed.config.get("data")
    if isinstance(saved_data, dict):
        for name, value in data.items():
            if name in saved_data and saved_data[name] != value:
                what = "prompt pairs" if name.startswith("pairs") else "preserve prompts"
                raise ValueError(f"resume: the {what} differ from the checkpoint's ({name} {saved_data[name]!r} there, "
                                 f"{value!r} now)")


def check_resumed_state(resumed, total_steps: int) -> tuple[int, dict]:
    """The step and history of a checkpoint's state.pt, checked: ValueError naming the field."""
    where = f"checkpoint {resumed.folder}: {STATE_FILE}"
    state = resumed.state
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int):
        raise ValueError(f"{where}: step must be an integer, got {step!r}")
    if not 0 <= step <= total_steps:
        raise ValueError(f"{where}: step {step} is outside this run's 0..{total_steps} steps")
    history = state.get("history")
    if not isinstance(history, dict):
        raise ValueError(f"{where}: history must be a dict, got {type(history).__name__}")
    for name in ("losses", "kept"):
        values = history.get(name)
        if not isinstance(values, list) or len(values) != step:
            count = len(values) if isinstance(values, list) else type(values).__name__
            raise ValueError(f"{where}: history[{name!r}] must list one value per step done ({step}), got {count}")
        if not all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in values):
            raise ValueError(f"{where}: history[{name!r}] holds a value that is not a number")
    optimizer_steps = history.get("optimizer_steps")
    if isinstance(optimizer_steps, bool) or not isinstance(optimizer_steps, int) or optimizer_steps < 0:
        raise ValueError(f"{where}: history['optimizer_steps'] must be an integer >= 0, got {optimizer_steps!r}")
    seconds = history.get("seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{where}: history['seconds'] must be a number >= 0, got {seconds!r}")
    rng = state.get("rng")
    if not isinstance(rng, dict) or not isinstance(rng.get("torch"), Tensor) or rng["torch"].dtype != torch.uint8:
        raise ValueError(f"{where}: rng must hold the torch generator state (a uint8 tensor)")
    return step, history


def check_run_folder(out: Path, force: bool) -> None:
    """FileExistsError unless `out` is free, or (force) holds only what an earlier run wrote there."""
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"output folder {out} exists and is not a folder")
    entries = sorted(entry.name for entry in out.iterdir())
    if not entries:
        return
    if not force:
        raise FileExistsError(f"output folder {out} exists and is not empty (use force to start over, or resume)")
    foreign = [name for name in entries if name not in RUN_FILES and not is_checkpoint_leftover(name)]
    checkpoint = out / "checkpoint"
    if not foreign and checkpoint.exists():
        if checkpoint.is_dir() and not checkpoint.is_symlink():
            inside = foreign_files(checkpoint, "checkpoint", legacy_checkpoint_names)
            foreign = [f"checkpoint/{name}" for name in inside]
        else:
            foreign = ["checkpoint"]
    if foreign:
        raise FileExistsError(f"not starting over in {out}: it holds files an erasure run did not write "
                              f"({some_of(foreign)}); move them out or choose another folder")


def is_checkpoint_leftover(name: str) -> bool:
    """A killed save's `checkpoint.partial-<pid>-<ns>` or `checkpoint.old-<pid>-<ns>`."""
    kind, _, rest = name.removeprefix("checkpoint.").partition("-")
    pid, _, nanoseconds = rest.partition("-")
    return name.startswith("checkpoint.") and kind in ("partial", "old") and pid.isdigit() and nanoseconds.isdigit()


def remove_run_files(out: Path) -> None:
    """Delete what an earlier run wrote into `out` (check_run_folder vouched that it is nothing else)."""
    import shutil

    if not out.is_dir():
        return
    for entry in out.iterdir():
        if entry.name in RUN_FILES or is_checkpoint_leftover(entry.name):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def erase(config: EraseConfig, *, pairs: list[PromptPair] | None = None, preserve: list[str] | None = None,
          progress: bool = True, on_step=None) -> EraseResult:
    """Run an erasure; returns where the checkpoint is and the per-step losses.

    The output folder holds `checkpoint/` (trainable tensors, optimizer state, step, config) and
    `metrics.json`. An existing output folder is refused unless `resume` (continue from its
    checkpoint) or `force` (start over) is set. `pairs` and `preserve`, when given, replace the pairs
    and the preserve prompts the config names (library use: made in code). `on_step(step, stats)`
    is called after each step.

    Under torchrun (a process group up) every rank calls it with the same arguments: each trains
    on its rows of every step (train_step), rank 0 alone checks and writes the output folder and
    shows progress, and a resume reads the checkpoint on rank 0 and hands it to the others. Every
    rank returns the same result (the whole batch's losses).
    """
    from tqdm.auto import tqdm

    ranks = distributed.current()

    def settings() -> tuple[list[PromptPair], list[str]]:
        config.validate()
        chosen = list(pairs) if pairs is not None else config.prompt_pairs()
        if not chosen:
            raise ValueError("no prompt pairs to train on")
        kept = list(preserve) if preserve is not None else config.preserve_prompts()
        if not all(isinstance(prompt, str) and prompt.strip() for prompt in kept):
            raise ValueError("preserve prompts must be non-empty strings")
        check_trainable_patterns(config.model, config.trainable, config.adapter)  # before minutes of loading weights
        if config.adapter is not None:
            import_peft()  # a missing peft fails here, not after the weights load
        return chosen, kept

    train_pairs, preserve_prompts = distributed.all_agree(settings, "the check of the run's settings on every rank")
    out = Path(config.out)
    checkpoint_dir = out / "checkpoint"
    data = data_fingerprint(train_pairs, preserve_prompts)
    total_steps = config.steps or config.epochs * steps_per_epoch(len(train_pairs), config.batch_size)

    def output_folder():
        """Rank 0's look at the output folder: the checkpoint to resume, checked, or a free folder."""
        resumed = None
        if config.resume:
            resumed = load_checkpoint(checkpoint_dir)  # also completes a save that a kill interrupted
            check_resume_config(resumed, config, data)
            check_resumed_state(resumed, total_steps)  # before minutes of loading weights
        else:
            check_run_folder(out, config.force)
        check_writable(out, "output folder")
        return resumed

    resumed = distributed.main_decides(output_folder, "rank 0's check of the output folder (and of the checkpoint it resumes)")

    model, tokenizer = load_janus(config.model, dtype=config.dtype, device=config.device,
                                  load_in_8bit=config.load_in_8bit)
    adapted = None
    if config.adapter is not None:
        # LoRA pairs on the --trainable modules; the teacher is the model with them switched off
        adapted, trainable = attach_lora(model, config.trainable, rank=config.lora_rank,
                                         alpha=config.effective_lora_alpha(), dropout=config.lora_dropout,
                                         seed=config.seed, base_model=config.model)
        teacher = AdapterOff(adapted)
    else:
        trainable = select_trainable(model, config.trainable)
        teacher = FrozenTeacher(trainable)  # the base model's tensors, before a resumed student replaces them
    if resumed is not None:
        apply_trainable(model, resumed.tensors)
    optimizer = make_optimizer(config.optimizer, trainable.values(), config.lr, config.weight_decay)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)

    callers_rng = _rng_state()  # given back at the end: the run's own RNG does not leak into the caller's
    if resumed is None:
        history = {"losses": [], "kept": [], "preserve_losses": [], "optimizer_steps": 0, "seconds": 0.0}
        start_step = 0
        # The images have seeds of their own; what else draws (LoRA dropout) starts from the run's
        # seed, so that a run is a function of its config wherever it runs.
        torch.manual_seed(derived_seed(config.seed, 0, DROPOUT_STREAM))
        if config.force and ranks.main:
            remove_run_files(out)  # start over: what an earlier run wrote here is not this run's
    else:
        start_step, history = resumed.state["step"], resumed.state["history"]
        try:
            optimizer.load_state_dict(resumed.optimizer_state)
            _set_rng_state(resumed.state["rng"])
        except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as error:
            raise ValueError(f"checkpoint {checkpoint_dir}: {OPTIMIZER_FILE} or {STATE_FILE} does not fit this run "
                             f"({type(error).__name__}: {first_line(error)})") from None
        del resumed  # its tensors are in the model and the optimizer now
    if ranks.main:
        out.mkdir(parents=True, exist_ok=True)

    def save(step: int) -> None:
        if not ranks.main:
            return  # the ranks' weights and optimizer states are the same: rank 0 writes them
        save_checkpoint(
            checkpoint_dir, tensors={name: p.detach() for name, p in trainable.items()},
            optimizer_state=optimizer.state_dict(), state={"step": step, "history": history, "rng": _rng_state()},
            config={"erase": config.to_json(), "total_steps": total_steps, "data": data}, base_model=config.model,
            force=True,
            # an adapter run's checkpoint is also the PEFT adapter folder of the same tensors
            write_more=None if adapted is None else lambda folder: write_adapter_files(adapted, folder, config.model),
        )

    parameters = list(trainable.values())
    bar = tqdm(total=total_steps, initial=start_step, disable=not (progress and ranks.main), desc="erase", unit="step")
    started = time.perf_counter()
    try:  # the bar ends its line before any error (a lost peer, a divergence) is printed
        for step in range(start_step, total_steps):
            batch = batch_for_step(train_pairs, step, config.batch_size, config.seed)
            preserve_batch = (batch_for_step(preserve_prompts, step, config.batch_size, config.seed + 1)
                              if preserve_prompts else None)
            stats = train_step(model, tokenizer, teacher, optimizer, batch, step, config, parameters, preserve_batch)
            if not all(math.isfinite(value) for key, value in stats.items() if key != "optimizer_steps"):
                raise TrainingDiverged(f"step {step + 1}: the loss is {stats['loss']} (the trainable weights are no "
                                       f"longer finite, or the model gives non-finite logits; lr {config.lr:g} too "
                                       "high?); nothing of this step was saved")
            history["losses"].append(stats["loss"])
            history["kept"].append(stats["kept"])
            history["optimizer_steps"] += stats["optimizer_steps"]
            postfix = dict(loss=f"{stats['loss']:.4f}", kept=f"{stats['kept']:.2f}")
            if "preserve_loss" in stats:
                history.setdefault("preserve_losses", []).append(stats["preserve_loss"])
                postfix["keep"] = f"{stats['preserve_loss']:.4f}"
            bar.set_postfix(**postfix)
            bar.update(1)
            if config.save_every and (step + 1) % config.save_every == 0 and step + 1 < total_steps:
                history["seconds"] += time.perf_counter() - started
                started = time.perf_counter()
                save(step + 1)
            if on_step is not None:
                on_step(step, stats)
    finally:
        bar.close()
    history["seconds"] += time.perf_counter() - started
    save(total_steps)
    _set_rng_state(callers_rng)
    if ranks.main:
        metrics = {"steps": total_steps, "optimizer_steps": history["optimizer_steps"], "losses": history["losses"],
                   "kept_fractions": history["kept"], "preserve_losses": history.get("preserve_losses", []),
                   "seconds": history["seconds"], "config": config.to_json()}
        write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=1) + "\n")
    # Every rank ends when the run's files are written (or all end with PeerLost when rank 0 could not).
    distributed.barrier("the end of the run (rank 0 writing the final checkpoint and metrics.json)")
    return EraseResult(out=out, checkpoint=checkpoint_dir, steps=total_steps,
                       optimizer_steps=history["optimizer_steps"], losses=history["losses"],
                       kept_fractions=history["kept"], preserve_losses=history.get("preserve_losses", []),
                       seconds=history["seconds"])
