"""earkit's classifier-free-guidance sampler for Janus image tokens, and writing the images out.

Not `model.generate`: in transformers 5.17 it fails outright for images, it crashes at
guidance_scale <= 1, and it applies top-k 50 after CFG unless told otherwise (DESIGN.md, "Janus in
transformers: traps"). This sampler is one loop:

    prefill   the B prompt rows (+ B unconditional rows when guidance_scale > 1) in one pass,
              into a StaticCache sized prompt + T; the state at <begin_of_image> scores token 0
    step t    feed image token t - 1 (all rows get the token their prompt drew), score token t
    sample    CFG logits = uncond + scale * (cond - uncond) in fp32, then temperature, optional
              top-k / top-p, and a draw with the row's own uniform (or argmax at temperature 0)

It uses the same prompt template, left padding and position ids as the teacher-forced pass in
model.py (`encode_prompts`, `unconditional`, `positions`), so the logits it samples from equal
`image_logits(model, image_hidden_states(model, prompts, tokens))` to fp32 rounding, and a prompt
gives the same logits whatever longer prompts share its batch (tests/engine/test_sampler.py checks both).

Randomness: every image has a seed of its own. Row i is drawn by a torch.Generator seeded with
seeds[i], on the model's device: it draws the row's T uniforms once, and token t is the first
whose cumulative probability (float64) exceeds u_t (inverse-CDF sampling, one uniform a token).
So an image depends on its prompt, its seed and the settings, not on which other rows share its
batch, on batch_size, or on which process of a torchrun job drew it (up to the fp rounding of its
logits, which a batch of other prompts may change in the last bit; a job that shards whole
batches, as engine/drawing.py does, sees none of that).

CUDA graphs: the single-token decode step (language model + generation head) reads its inputs
from static buffers and the StaticCache advances its own device-side write index, so after two
eager warm-up steps the step is captured once with torch.cuda.graph and replayed for the rest of
the image. If capture fails the sampler warns once and goes on eagerly.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from .model import (PromptBatch, cache_keyword, cfg_pad_id, encode_prompts, image_logits, image_token_count, positions,
                    unconditional)

# Eager decode steps before capture: they initialise cuBLAS handles, workspaces and the like
# outside the graph. They are real steps of the image, not throw-away runs, because every run
# of the step writes into the KV cache.
GRAPH_WARMUP_STEPS = 2
# The CUDA graph path is only known to capture with these attention implementations: their
# masks are built with device-side tensor ops only (flash_attention_2 unpads with data-dependent
# shapes, which a graph cannot hold).
GRAPH_ATTENTION = ("sdpa", "eager")

_warned: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


# ---------------------------------------------------------------- arguments and the sampling rule


# What a model whose generation_config.json sets neither is sampled with: Janus-Pro's guidance 5
# (transformers' Janus `generate` falls back to 5 as well) and temperature 1 (the model's own
# distribution). A model folder states its own in generation_config.json (`guidance_scale`,
# `temperature`), as ShapesWorld's generator does.
DEFAULT_GUIDANCE_SCALE, DEFAULT_TEMPERATURE = 5.0, 1.0


def sampling_defaults(generation_config) -> tuple[float, float]:
    """(guidance_scale, temperature) of a GenerationConfig (model.generation_config), each one it
    leaves unset (or a None config) taken as Janus-Pro's 5 and 1."""
    values = []
    for name, default in (("guidance_scale", DEFAULT_GUIDANCE_SCALE), ("temperature", DEFAULT_TEMPERATURE)):
        value = getattr(generation_config, name, None)
        if value is None:
            values.append(default)
            continue
        try:
            values.append(float(value))
        except (TypeError, ValueError):
            raise ValueError(f"the model's generation_config.json: {name} must be a number, got {value!r}") from None
    return values[0], values[1]


def source_sampling_defaults(model_source) -> tuple[float, float]:
    """sampling_defaults of a model folder or hub id, read from its generation_config.json before
    the weights load (what the model will have as model.generation_config); 5 and 1 without one.
    A hub id is looked up in the local cache only: no network before the model itself loads."""
    from transformers import GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(str(model_source), local_files_only=True)
    except (OSError, ValueError):  # no generation_config.json (or a hub model not yet downloaded)
        config = None
    return sampling_defaults(config)


def resolve_sampling(model, guidance_scale, temperature) -> tuple[float, float]:
    """The guidance scale and temperature a call samples with: each one given, else the model's."""
    return _given_else(guidance_scale, temperature, lambda: sampling_defaults(getattr(model, "generation_config", None)))


def resolve_source_sampling(model_source, guidance_scale, temperature) -> tuple[float, float]:
    """resolve_sampling for a model folder or hub id before its weights load (a command checks the
    values before minutes of loading): each one given, else its generation_config.json's."""
    return _given_else(guidance_scale, temperature, lambda: source_sampling_defaults(model_source))


def _given_else(guidance_scale, temperature, defaults) -> tuple[float, float]:
    if guidance_scale is not None and temperature is not None:
        return guidance_scale, temperature
    guidance_default, temperature_default = defaults()
    return (guidance_default if guidance_scale is None else guidance_scale,
            temperature_default if temperature is None else temperature)


def check_sampling_arguments(guidance_scale, temperature, top_k, top_p) -> None:
    """ValueError naming the argument for anything the sampler cannot honour."""
    if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale) or guidance_scale < 1:
        raise ValueError(f"guidance_scale must be a finite number >= 1 (1 = no guidance), got {guidance_scale!r}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an integer >= 1, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")


# torch.Generator.manual_seed takes any integer in [-2**63, 2**64)
SEED_RANGE = (-(2 ** 63), 2 ** 64)


def check_image_seeds(seeds, rows: int) -> list[int]:
    """One integer seed per row, each one torch.Generator.manual_seed takes: ValueError otherwise."""
    seeds = list(seeds)
    if len(seeds) != rows:
        raise ValueError(f"seeds must give one seed per prompt: {rows} prompts, {len(seeds)} seeds")
    for value in seeds:
        if isinstance(value, bool) or not isinstance(value, int) or not SEED_RANGE[0] <= value < SEED_RANGE[1]:
            raise ValueError(f"seeds must be integers in [-2**63, 2**64), got {value!r}")
    return seeds


def derived_seed(*parts) -> int:
    """A seed in [0, 2**63) from a tuple of integers (a run's seed, a step, a row...): distinct
    tuples give unrelated seeds, where sums and products of them would collide."""
    import hashlib

    digest = hashlib.sha256(repr(tuple(int(part) for part in parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def keep_top_k(logits: Tensor, top_k: int) -> Tensor:
    """-inf everywhere but the k largest logits of each row (ties at the k-th value are kept)."""
    if top_k >= logits.shape[-1]:
        return logits
    kth_largest = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def keep_top_p(logits: Tensor, top_p: float) -> Tensor:
    """-inf everywhere but the smallest set of most likely tokens whose probability reaches top_p
    (nucleus sampling). The most likely token is always kept."""
    if top_p >= 1:
        return logits  # keep everything: the cumulative sum may round to 1 before the tail
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
    drop_sorted = mass_before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def row_uniforms(seeds: list[int], count: int, device) -> Tensor:
    """(rows, count) float64 uniforms in [0, 1): row i from a torch.Generator seeded with seeds[i]
    on `device`, so a row's numbers are its own whatever rows it is batched with."""
    rows = [torch.rand(count, dtype=torch.float64, device=device,
                       generator=torch.Generator(device=device).manual_seed(seed)) for seed in seeds]
    return torch.stack(rows) if rows else torch.empty(0, count, dtype=torch.float64, device=device)


def inverse_cdf(probs: Tensor, uniforms: Tensor) -> Tensor:
    """The token of each row whose cumulative probability first exceeds uniform * total: a draw
    from the row's distribution given one uniform a row. Zero-probability tokens (top-k / top-p)
    are never chosen: the cumulative sum does not rise over them."""
    cumulative = probs.double().cumsum(dim=-1)
    total = cumulative[:, -1:]
    chosen = torch.searchsorted(cumulative, uniforms[:, None] * total, right=True)
    # u * total can round up to total itself: the last token of non-zero probability then
    last_possible = (cumulative < total).sum(dim=-1, keepdim=True)
    return torch.minimum(chosen, last_possible).squeeze(-1)


def pick_tokens(logits: Tensor, *, temperature: float, top_k: int | None, top_p: float | None,
                uniforms: Tensor | None) -> Tensor:
    """One token per row from fp32 logits (rows, V): argmax at temperature 0, else a draw from
    softmax(logits / temperature), optionally restricted to the top-k / top-p tokens, with the
    row's uniform (rows,) in [0, 1)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        logits = keep_top_k(logits, top_k)
    if top_p is not None:
        logits = keep_top_p(logits, top_p)
    return inverse_cdf(torch.softmax(logits, dim=-1), uniforms)


def guided(logits: Tensor, prompts: int, guidance_scale: float) -> Tensor:
    """CFG in fp32: rows [0, prompts) are conditional, rows [prompts, 2 prompts) unconditional."""
    cond = logits[:prompts].float()
    if guidance_scale == 1:
        return cond
    uncond = logits[prompts:].float()
    return uncond + guidance_scale * (cond - uncond)


# ---------------------------------------------------------------- the decode step and its CUDA graph


def cuda_graph_blocker(model) -> str | None:
    """Why the decode step of this model cannot be captured in a CUDA graph, or None if it can."""
    if model.device.type != "cuda":
        return f"the model is on {model.device.type}, not CUDA"
    attention = model.config.get_text_config()._attn_implementation
    if attention not in GRAPH_ATTENTION:
        return f"attention implementation {attention!r} (graphs need one of {GRAPH_ATTENTION})"
    if getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False):
        return "bitsandbytes quantized weights (data-dependent outlier handling)"
    return None


def capture_cuda_graph(function):
    """Record the kernels `function()` launches into a CUDA graph, without running them.

    Returns (replay, output): replay() runs the recorded kernels again on whatever the input
    buffers then hold and overwrites `output` in place (the graph owns its memory)."""
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = function()
    return graph.replay, output


class DecodeStep:
    """Feed one image token per row through the language model and score the next with the head.

    Inputs live in static buffers that each step overwrites in place: the image-token embeddings
    (rows, 1, H), the position ids (rows, 1) and a 2D attention mask over every cache slot
    (rows, P + T: the prompt's mask, then 1 for each image slot written so far, 0 for the rest).
    With those and the StaticCache's device-side write index, `forward` launches the same kernels
    at every step, which is what lets it be captured once and replayed.
    """

    def __init__(self, model, cache, prompts: PromptBatch, image_tokens: int, *, use_graph: bool):
        self.model = model
        self.language_model = model.model.language_model
        self.cache_kwargs = {cache_keyword(self.language_model): cache}
        rows, self.prompt_width = prompts.input_ids.shape
        device = prompts.input_ids.device
        embed_dtype = model.get_input_embeddings().weight.dtype
        hidden_size = model.config.get_text_config().hidden_size
        image_slots = prompts.attention_mask.new_zeros(rows, image_tokens)
        self.attention_mask = torch.cat([prompts.attention_mask, image_slots], dim=1)
        # Image token t sits at position (real prompt length + t) in every row, padding or not.
        self.prompt_lengths = prompts.attention_mask.sum(dim=1, keepdim=True)
        self.position_ids = self.prompt_lengths.clone()
        self.embeds = torch.zeros(rows, 1, hidden_size, dtype=embed_dtype, device=device)
        self.use_graph = use_graph
        self.eager_steps = 0
        self.replay = None  # set once the step is captured
        self.output = None

    def prefill(self, prompts: PromptBatch) -> Tensor:
        """Run the whole prompt into the empty cache; logits for image token 0 (rows, V)."""
        embeds = self.model.get_input_embeddings()(prompts.input_ids)
        output = self.language_model(inputs_embeds=embeds, attention_mask=prompts.attention_mask,
                                     position_ids=positions(prompts.attention_mask), use_cache=True,
                                     **self.cache_kwargs)
        return image_logits(self.model, output.last_hidden_state[:, -1])

    def forward(self) -> Tensor:
        """The captured function: reads only the static buffers and the cache."""
        output = self.language_model(inputs_embeds=self.embeds, attention_mask=self.attention_mask,
                                     position_ids=self.position_ids, use_cache=True, **self.cache_kwargs)
        return image_logits(self.model, output.last_hidden_state[:, -1])

    def __call__(self, tokens: Tensor, index: int) -> Tensor:
        """Feed image token `index` (one per row, shape (rows,)); logits for token index + 1.

        The returned tensor is the graph's output buffer when graphed: read it before the next call.
        """
        self.embeds.copy_(self.model.prepare_embeddings_for_image_generation(tokens)[:, None, :])
        self.position_ids.copy_(self.prompt_lengths + index)
        self.attention_mask[:, self.prompt_width + index] = 1
        if self.replay is not None:
            self.replay()
            return self.output
        if not self.use_graph or self.eager_steps < GRAPH_WARMUP_STEPS:
            self.eager_steps += 1
            return self.forward()
        try:
            self.replay, self.output = capture_cuda_graph(self.forward)
        except Exception as error:  # noqa: BLE001 - any capture failure means: run eagerly
            warn_once(f"earkit sampler: CUDA graph capture failed, decoding eagerly ({type(error).__name__}: {error})")
            self.use_graph, self.replay = False, None
            return self.forward()  # capture ran nothing, so this step is still to do
        self.replay()  # capture only recorded the kernels: run them for this step
        return self.output


@contextmanager
def eval_mode(model):
    """Sample in eval mode: with gradient checkpointing and training mode, transformers 5.17
    silently drops use_cache and the cache. Each module's mode is restored afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


# ---------------------------------------------------------------- sampling


def sample_chunk(model, tokenizer, prompts: list[str], *, guidance_scale, temperature, top_k, top_p, seeds,
                 use_graph, progress_bar, logits_out: Tensor | None) -> Tensor:
    """Image tokens (len(prompts), T) for one chunk of prompts; fills logits_out (B, T, V) if given."""
    from transformers import StaticCache

    device = model.device
    image_tokens = image_token_count(model)
    batch = encode_prompts(tokenizer, prompts, device=device)
    count = len(prompts)
    if guidance_scale > 1:
        uncond = unconditional(batch, tokenizer, cfg_pad_id(model, tokenizer))
        batch = PromptBatch(torch.cat([batch.input_ids, uncond.input_ids]),
                            torch.cat([batch.attention_mask, uncond.attention_mask]))
    cache = StaticCache(config=model.config.get_text_config(), max_cache_len=batch.length + image_tokens)
    step = DecodeStep(model, cache, batch, image_tokens, use_graph=use_graph)
    tokens = torch.empty(count, image_tokens, dtype=torch.long, device=device)
    copies = batch.input_ids.shape[0] // count  # 2 with CFG: both rows of a prompt get its token
    uniforms = row_uniforms(seeds, image_tokens, device) if temperature != 0 else None

    logits = step.prefill(batch)
    for index in range(image_tokens):
        if index > 0:
            logits = step(tokens[:, index - 1].repeat(copies), index - 1)
        if logits_out is not None:
            logits_out[:, index] = logits[:count]  # copies (and upcasts): the graph reuses `logits`
        tokens[:, index] = pick_tokens(guided(logits, count, guidance_scale), temperature=temperature, top_k=top_k,
                                       top_p=top_p, uniforms=None if uniforms is None else uniforms[:, index])
        progress_bar.update(1)
    return tokens


@torch.no_grad()
def sample_image_tokens(model, tokenizer, prompts: list[str], *, guidance_scale: float | None = None,
                        temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                        seed: int = 0, seeds=None, cuda_graph: bool | str = "auto", batch_size: int | None = None,
                        progress: bool = True, return_logits: bool = False):
    """Sample Janus image tokens for each prompt with classifier-free guidance.

    Returns a LongTensor (len(prompts), T) of VQ codebook indices on the model's device,
    T = model.config.vision_config.num_image_tokens. With return_logits=True returns
    (tokens, logits): logits (len(prompts), T, V) fp32 are the conditional rows' raw
    generation-head logits at each step, before guidance (T x V x 4 bytes per prompt, 38 MB at
    Janus-Pro's size: meant for tests and diagnostics).

    guidance_scale: 1 = conditional only (no unconditional rows); > 1 = CFG with the
    unconditional rows of `unconditional` (BOS and <begin_of_image> kept, the rest the pad the
    model's generation_config names, else the tokenizer's: model.cfg_pad_id).
    temperature: 0 = greedy. Either one None: the model's generation_config, else 5 and 1
    (sampling_defaults). top_k / top_p: None = off (the full CFG distribution, as the
    reference sampler draws). seeds: one integer per prompt, the seed of its image (None: prompt
    i gets seed + i). cuda_graph: "auto" (on for CUDA models that support it), True
    (warn when it cannot), False. batch_size: prompts per chunk (None = all at once).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty")
    guidance_scale, temperature = resolve_sampling(model, guidance_scale, temperature)
    check_sampling_arguments(guidance_scale, temperature, top_k, top_p)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be None or an integer >= 1, got {batch_size!r}")
    seeds = check_image_seeds(seeds if seeds is not None else [seed + i for i in range(len(prompts))], len(prompts))
    if cuda_graph not in ("auto", True, False):
        raise ValueError(f"cuda_graph must be 'auto', True or False, got {cuda_graph!r}")
    blocker = cuda_graph_blocker(model) if cuda_graph is not False else None
    if cuda_graph is True and blocker is not None:
        warn_once(f"earkit sampler: cuda_graph=True but {blocker}; decoding eagerly")
    use_graph = cuda_graph is not False and blocker is None
    if progress:  # encode_prompts warns of unknown words: before the bar starts, not inside its line
        encode_prompts(tokenizer, list(dict.fromkeys(prompts)))

    from tqdm.auto import tqdm

    device = model.device
    chunk = batch_size or len(prompts)
    image_tokens = image_token_count(model)
    logits = None
    if return_logits:
        codebook = model.model.generation_head.vision_head.out_features
        logits = torch.empty(len(prompts), image_tokens, codebook, dtype=torch.float32, device=device)
    tokens = []
    steps = math.ceil(len(prompts) / chunk) * image_tokens
    with eval_mode(model), tqdm(total=steps, disable=not progress, unit="step", desc="sampling") as bar:
        for start in range(0, len(prompts), chunk):
            part = prompts[start:start + chunk]
            tokens.append(sample_chunk(
                model, tokenizer, part, guidance_scale=guidance_scale, temperature=temperature, top_k=top_k,
                top_p=top_p, seeds=seeds[start:start + len(part)], use_graph=use_graph, progress_bar=bar,
                logits_out=logits[start:start + len(part)] if logits is not None else None))
    tokens = torch.cat(tokens)
    return (tokens, logits) if return_logits else tokens


# ---------------------------------------------------------------- images


@torch.no_grad()
def decode_images(model, tokens: Tensor, *, batch_size: int = 8) -> list:
    """PIL RGB images from image tokens (B, T), decoded by the VQ model `batch_size` at a time.

    decode_image_tokens gives channels-last pixels in [-1, 1]; they are converted here, not by
    the image processor, whose postprocess fails on channels-last input in 5.x."""
    from PIL import Image

    if tokens.ndim != 2:
        raise ValueError(f"tokens must be (batch, image tokens), got shape {tuple(tokens.shape)}")
    images = []
    for start in range(0, tokens.shape[0], batch_size):
        pixels = model.decode_image_tokens(tokens[start:start + batch_size].to(model.device))
        pixels = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().numpy()
        images.extend(Image.fromarray(array) for array in pixels)
    return images


def image_grid(rows: list[list]):
    """One image from rows of equally sized PIL images (a row per prompt), white where a row is short."""
    import torch
    from torchvision.transforms.functional import pil_to_tensor, to_pil_image
    from torchvision.utils import make_grid

    columns = max(len(row) for row in rows)
    blank = torch.full_like(pil_to_tensor(rows[0][0].convert("RGB")), 255)
    tiles = [tile for row in rows for tile in [pil_to_tensor(image.convert("RGB")) for image in row]
             + [blank] * (columns - len(row))]
    return to_pil_image(make_grid(torch.stack(tiles), nrow=columns, padding=0))


SAMPLES_RECORD_NAMES = {"grid.png", "prompts.json"}
GRID_PROMPTS = 32  # grid.png shows the first 32 prompts' images: one row each


def is_partial_image(name: str) -> bool:
    """A killed image write's temporary file (earkit.io.write_files_atomic): .NAME.partial-PID-NS."""
    stem, _, stamp = name.rpartition(".partial-")
    pid, _, nanoseconds = stamp.partition("-")
    return name.startswith(".") and bool(stem) and pid.isdigit() and nanoseconds.isdigit()


def legacy_samples_names(folder: Path) -> set[str] | None:
    """The names a samples folder without a finished manifest may hold: one being drawn (its
    images.json lists the files it will hold), or one written before manifests existed (its
    prompts.json lists its images)."""
    from earkit.io import parse_json

    from .drawing import STORE_RECORD

    try:
        record = parse_json((folder / STORE_RECORD).read_text(encoding="utf-8"), STORE_RECORD)
        names = set(record["files"])
    except (OSError, ValueError, KeyError, TypeError):
        names = None
    if names is None:
        try:
            record = parse_json((folder / "prompts.json").read_text(encoding="utf-8"), "prompts.json")
            names = {image["file"] for image in record["images"]}
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if "rng" not in record:
            return None
    if not all(isinstance(name, str) for name in names):
        return None
    partial = {entry.name for entry in folder.iterdir() if is_partial_image(entry.name)}
    return names | partial | SAMPLES_RECORD_NAMES | {STORE_RECORD}


def samples_identity(identity: dict, prompts: list[str], images_per_prompt: int, seed: int) -> dict:
    """What a samples folder's images were drawn with: the drawing identity, plus the prompts
    (their digest: file names number them), images per prompt and the first seed."""
    from earkit.io import json_digest

    return {**identity, "prompts_sha256": json_digest(prompts), "prompts": len(prompts), "images_per_prompt": images_per_prompt,
            "seed": seed}


def check_samples_folder(out_dir, *, force: bool, identity: dict | None = None) -> str:
    """What writing samples into out_dir will do, checked before any sampling: "new" (free or
    empty), "continue" (it holds images drawn with this identity: draw only what is missing),
    or "replace" (force, and everything in it is an earlier samples folder's). FileExistsError
    for a folder of other files (force never deletes a file earkit did not write), ValueError
    naming the first setting that differs from the images there (without force);
    PermissionError when nothing can be written there."""
    from earkit.io import check_replaceable, check_writable

    from .drawing import STORE_RECORD, ImageStore, OtherSettings

    out_dir = Path(out_dir).expanduser()
    check_writable(out_dir, "samples folder")
    if not out_dir.exists() or (out_dir.is_dir() and not out_dir.is_symlink() and not any(out_dir.iterdir())):
        return "new"
    if identity is not None and not force and (out_dir / STORE_RECORD).is_file():
        try:
            ImageStore(out_dir, identity, what="samples folder").check()
        except OtherSettings as error:
            raise ValueError(f"{error} (or pass --force to start over)") from None
        return "continue"
    check_replaceable(out_dir, force=force, kind="samples", what="samples folder", legacy=legacy_samples_names)
    return "replace"


def clear_samples_folder(out_dir: Path) -> None:
    """Empty an earlier samples folder (check_samples_folder said "replace": all of it is earkit's)."""
    import shutil

    for entry in out_dir.iterdir():
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def write_samples(model, tokenizer, prompts: list[str], out_dir: str | os.PathLike, *, images_per_prompt: int = 1,
                  seed: int = 0, guidance_scale: float | None = None, temperature: float | None = None,
                  top_k: int | None = None, top_p: float | None = None, force: bool = False, batch_size: int = 16,
                  progress: bool = True, identity: dict | None = None) -> list[Path] | None:
    """Sample images_per_prompt images per prompt and write them to out_dir.

    Files: {prompt_index:03d}_{image_index:02d}.png (image i of every prompt is drawn with seed
    seed + i), images.json (what they are drawn with), then grid.png (a row per prompt, for the
    first GRID_PROMPTS prompts),
    prompts.json (prompts, seeds, settings, which file is which) and the manifest of earkit's
    files. Images are written as they are drawn, each whole: a rerun of a killed run with the
    same prompts and settings draws only the images that are missing; other settings are refused
    by name. force starts over, in an earlier samples folder only (never one holding files earkit
    did not write). Under torchrun every rank draws its share of the batches and rank 0 writes
    (the other ranks return None). Returns the written paths. guidance_scale / temperature None:
    the model's generation_config, else 5 and 1 (sampling_defaults). identity: what
    engine.drawing.drawing_identity gives for this model and checkpoint (a command passes the
    one it checked before loading); None: taken from the model (no checkpoint).
    """
    from earkit.io import write_files_atomic, write_manifest

    from . import distributed
    from .drawing import STORE_RECORD, ImageStore, Job, draw_images, drawing_identity

    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty")
    if isinstance(images_per_prompt, bool) or not isinstance(images_per_prompt, int) or images_per_prompt < 1:
        raise ValueError(f"images_per_prompt must be an integer >= 1, got {images_per_prompt!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    guidance_scale, temperature = resolve_sampling(model, guidance_scale, temperature)
    check_sampling_arguments(guidance_scale, temperature, top_k, top_p)
    check_image_seeds([seed, seed + images_per_prompt - 1], 2)
    out_dir = Path(out_dir)
    if identity is None:
        identity = drawing_identity(model=getattr(model, "name_or_path", None) or None, guidance_scale=guidance_scale,
                                    temperature=temperature, top_k=top_k, top_p=top_p, batch_size=batch_size,
                                    dtype=model.dtype, device=model.device)
    identity = samples_identity(identity, prompts, images_per_prompt, seed)
    jobs = [Job(prompt, seed + i, f"{p:03d}_{i:02d}.png") for p, prompt in enumerate(prompts)
            for i in range(images_per_prompt)]
    names = [job.name for job in jobs]
    main = distributed.current().main
    store = ImageStore(out_dir, identity, what="samples folder", extra={"files": names})
    if main:
        if check_samples_folder(out_dir, force=force, identity=identity) == "replace":
            clear_samples_folder(out_dir)
    draw_images(model, tokenizer, jobs, guidance_scale=guidance_scale, temperature=temperature, top_k=top_k,
                top_p=top_p, batch_size=batch_size, store=store, progress=progress, desc="sampling", keep=False)
    if not main:
        return None
    shown = prompts[:GRID_PROMPTS]  # the grid's rows; the images themselves are read back from the folder

    record = {
        "format": "earkit-samples",
        "prompts": prompts,
        "seed": seed,
        "model": identity.get("model"),
        "checkpoint": identity.get("checkpoint"),
        "settings": {"images_per_prompt": images_per_prompt, "guidance_scale": guidance_scale,
                     "temperature": temperature, "top_k": top_k, "top_p": top_p, "batch_size": batch_size,
                     "image_tokens": image_token_count(model)},
        "rng": "each image its own torch.Generator, seeded with its seed: seed + its index among its prompt's images",
        "images": [{"file": job.name, "prompt_index": index // images_per_prompt,
                    "image_index": index % images_per_prompt, "seed": job.seed, "prompt": job.prompt}
                   for index, job in enumerate(jobs)],
    }
    import io

    grid = io.BytesIO()
    image_grid([[store.load(names[p * images_per_prompt + i]) for i in range(images_per_prompt)]
                for p in range(len(shown))]).save(grid, format="PNG")
    write_files_atomic({out_dir / "grid.png": grid.getvalue(),
                        out_dir / "prompts.json": (json.dumps(record, indent=2, ensure_ascii=False) + "\n").encode(
                            "utf-8", "surrogatepass")})
    # last: a folder with its manifest is a finished one; it names earkit's files only
    write_manifest(out_dir, "samples", names + ["grid.png", "prompts.json", STORE_RECORD])
    return [out_dir / name for name in names] + [out_dir / "grid.png", out_dir / "prompts.json"]
