"""The ShapesWorld generator: a tiny Janus that earkit trains itself, on a 2-core CPU, in minutes.

Nothing can be downloaded here, so the default model that `earkit erase` works on is built from
scratch out of the real transformers classes (DESIGN.md, "ShapesWorld: the embedded default"):

    1. train_vq         a JanusVQVAE image tokenizer for 64 x 64 ShapesWorld images: 8 x 8 patches,
                        so 64 image tokens per image, from a 256-code codebook whose codes a fixed
                        rule gives each patch from its own pixels (PatchCodes)
    2. train_generator  a JanusForConditionalGeneration (a Llama of a few layers) whose generation
                        head learns to draw captions as those 64 tokens, teacher-forced, through
                        earkit's own masked_cross_entropy kernel; ~10% of rows train the
                        unconditional prompt, so that classifier-free guidance works
    3. build_generator  both, saved as one from_pretrained folder with its word-level tokenizer,
                        the patch-code rule and a world.json (configs, seeds, training times,
                        how often the VQ encoder gives the rule's code)

    folder = build_generator("world_generator/")
    model, tokenizer = load_janus(folder)
    images = decode_images(model, sample_image_tokens(model, tokenizer, ["a red star"]))

Everything is deterministic from the seeds in the configs (on a given machine and thread count).
The defaults fit the budget: on 2 CPU cores the VQ model trains in about 2 minutes and the
generator in about 5 (measured: 122.7 s and 280.0 s for the shipped world), a saved folder of
7 MB. `tiny_budget()` gives configs of a handful of steps for tests.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import GUIDANCE_SCALE, TEMPERATURE
from . import render as world
from earkit.io import check_replaceable, write_folder_atomically
from ..model import encode_prompts, image_hidden_states, image_logits, unconditional, write_model_notes
from ..tiny import tiny_janus_config, word_tokenizer

# ---------------------------------------------------------------- configs


@dataclass
class VQConfig:
    seed: int = 0
    images: int = 4000  # rendered training pool; batches are drawn from it at random
    image_size: int = 64
    patch_size: int = 8  # 64 / 8 = an 8 x 8 grid of 64 image tokens
    # 3 backgrounds + 6 colours x (inside + 41 edge geometries) = 255 codes (one spare). ShapesWorld
    # patches take about 210 distinct edge masks; 41 centroids keep every one within a pixel or two.
    codebook_size: int = 256
    embed_dim: int = 8
    base_channels: int = 32  # the smallest GroupNorm(32) allows; cost is dominated by the 64 x 64 level
    steps: int = 800
    batch_size: int = 8
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    grad_clip: float = 1.0
    foreground_weight: float = 3.0  # extra loss weight on shape pixels (see reconstruction_loss)
    # the encoder's cross-entropy beside the decoder's pixel loss: at 0.1 (lr 5e-4, 300 steps) the
    # encoder gave 72% of patches their code, at 1.0 (lr 1e-3, 800 steps) 98%
    code_weight: float = 1.0
    bf16: bool = True  # autocast the convolutions to bfloat16 (AMX / AVX512-BF16 CPUs run them ~1.5x faster)


@dataclass
class GeneratorConfig:
    seed: int = 0
    images: int = 6000  # rendered and tokenized once; captions are re-drawn every time a scene is used
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    steps: int = 1500
    batch_size: int = 64
    learning_rate: float = 2e-3
    min_learning_rate: float = 1e-4
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    unconditional_probability: float = 0.1  # rows trained on the CFG unconditional prompt


def tiny_budget() -> tuple[VQConfig, GeneratorConfig]:
    """Configs of a handful of steps on a handful of images: the whole pipeline in seconds (tests)."""
    vq = VQConfig(images=16, steps=4, batch_size=4, warmup_steps=1)
    generator = GeneratorConfig(images=16, hidden_size=32, layers=1, heads=2, kv_heads=1, steps=3, batch_size=4,
                                warmup_steps=1)
    return vq, generator


def janus_config(vocab_size: int, vq: VQConfig, generator: GeneratorConfig | None = None):
    """The JanusConfig both stages share: the VQ model is `JanusVQVAE(janus_config(...).vq_config)`,
    the generator the whole of it. The ViT image encoder is tiny_janus_config's smallest (it is not
    used to generate)."""
    text = dict(hidden_size=generator.hidden_size, layers=generator.layers, heads=generator.heads,
                kv_heads=generator.kv_heads) if generator is not None else {}
    return tiny_janus_config(vocab_size, image_size=vq.image_size, patch_size=vq.patch_size,
                             codebook_size=vq.codebook_size, vq_embed_dim=vq.embed_dim,
                             vq_base_channels=vq.base_channels, **text)


def shapes_tokenizer():
    """The word-level tokenizer over every ShapesWorld word, with the Janus-Pro special tokens."""
    return word_tokenizer(world.vocabulary())


def learning_rate(step: int, steps: int, peak: float, warmup: int, floor: float = 0.0) -> float:
    """Linear warm-up, then cosine decay from peak to floor."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def autocast(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def progress_bar(iterable, progress: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not progress, desc=desc, dynamic_ncols=True)


# ---------------------------------------------------------------- 1. the VQ image tokenizer
#
# Every 8 x 8 patch gets its code from its own pixels, by a fixed rule (`PatchCodes`):
#   - a flat patch: one code per background colour, and one per shape colour (a shape's inside);
#   - any other patch (an edge): one code per (shape colour, edge geometry), the geometry being the
#     nearest of `edge_shapes` k-means centroids of the patch's coverage mask (the share of each
#     pixel that the shape covers, which does not depend on the colours).
# So a scene always gives the same 64 codes, and a shape moved by whole patches gives the same
# codes moved. The first version trained the VQ model end to end instead; its encoder sees the
# whole image (GroupNorm statistics, the mid-block attention), so a flat white patch got one code
# beside a red shape and another beside a blue one: the shipped world's backgrounds took 6 to 8
# codes per image, and the generator, spending itself on that noise, drew the requested shape in
# 76% of its images. The JanusVQVAE still learns everything it does: its decoder draws images from
# code grids (an edge code gives the colour and roughly the geometry, its neighbours the rest), and
# its encoder learns to give each patch its code (a 255-way classification), so the model's own
# `encode` tokenizes as the rule does; `encoder_accuracy` in world.json says how well.
#
# Janus's quantizer picks the nearest codebook vector by squared distance, and `decode` looks
# codes up l2-normalised; with every codebook vector on the unit sphere the two agree, and the
# nearest vector is the one of largest dot product, which is what the encoder is trained on.


class PatchCodes:
    """The rule that gives each 8 x 8 patch of a ShapesWorld render its code (see above).

    Codes: one per background colour (in world.BACKGROUNDS order), then per shape colour (in
    world.COLOURS order) its inside and its `edge_shapes` edge geometries.
    """

    FLAT = 0.01  # a patch whose mean coverage is within this of 0 or 1 is flat

    def __init__(self, geometries: torch.Tensor, patch_size: int):
        self.geometries = geometries  # (edge_shapes, patch_size ** 2) coverage-mask centroids
        self.patch_size = patch_size
        self.backgrounds = torch.tensor(list(world.BACKGROUNDS.values()), dtype=torch.float32)
        self.colours = torch.tensor(list(world.COLOURS.values()), dtype=torch.float32)

    @property
    def size(self) -> int:
        return len(self.backgrounds) + len(self.colours) * (1 + len(self.geometries))

    FILE = "patch_codes.safetensors"

    def save(self, folder) -> None:
        from safetensors.torch import save_file

        save_file({"geometries": self.geometries.contiguous()}, str(Path(folder) / self.FILE),
                  metadata={"patch_size": str(self.patch_size)})

    @classmethod
    def load(cls, folder) -> PatchCodes:
        """The rule a world's generator folder was built with."""
        from safetensors import safe_open

        with safe_open(str(Path(folder) / cls.FILE), framework="pt") as file:
            return cls(file.get_tensor("geometries"), int(file.metadata()["patch_size"]))

    def colour_code(self, colour: int, geometry: int | None = None) -> int:
        """The code of a shape colour's inside (geometry None) or of one of its edges."""
        per_colour = 1 + len(self.geometries)
        return len(self.backgrounds) + colour * per_colour + (0 if geometry is None else 1 + geometry)

    def coverage(self, images) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(per-patch coverage masks (N, patches, patch_size ** 2), background index (N,), colour index (N,)).

        The background is the corner pixel's palette colour (shapes never reach a corner); the
        shape's colour is the palette colour nearest the pixel farthest from the background; the
        coverage of a pixel is its position on the line from the one colour to the other.
        """
        pixels = torch.tensor(np.asarray(images), dtype=torch.float32)  # (N, S, S, 3) in 0..255
        n, side = pixels.shape[0], pixels.shape[1]
        background = torch.cdist(pixels[:, 0, 0], self.backgrounds).argmin(1)
        b = self.backgrounds[background][:, None, None]
        distance = (pixels - b).square().sum(-1).view(n, -1)
        farthest = pixels.view(n, -1, 3)[torch.arange(n), distance.argmax(1)]
        colour = torch.cdist(farthest, self.colours).argmin(1)
        c = self.colours[colour][:, None, None]
        alpha = ((pixels - b) * (c - b)).sum(-1) / (c - b).square().sum(-1)
        p, grid = self.patch_size, side // self.patch_size
        patches = alpha.clamp(0, 1).view(n, grid, p, grid, p).permute(0, 1, 3, 2, 4).reshape(n, grid * grid, p * p)
        return patches, background, colour

    def codes(self, images) -> torch.Tensor:
        """uint8 renders (N, S, S, 3) -> their codes (N, patches)."""
        patches, background, colour = self.coverage(images)
        mean = patches.mean(-1)
        geometry = torch.cdist(patches, self.geometries[None].expand(len(patches), -1, -1)).argmin(-1)
        per_colour = 1 + len(self.geometries)
        inside = len(self.backgrounds) + colour[:, None] * per_colour
        codes = torch.where(mean >= 1 - self.FLAT, inside, inside + 1 + geometry)
        return torch.where(mean <= self.FLAT, background[:, None].expand_as(codes), codes)

    def appearances(self) -> torch.Tensor:
        """What each code looks like, (size, patch_size ** 2 * 3) in 0..1: edges over a mid grey."""
        flat = torch.ones(self.patch_size ** 2, 1)
        grey = torch.full((3,), 128.0)
        rows = [flat * colour for colour in self.backgrounds]
        for colour in self.colours:
            rows.append(flat * colour)
            rows.extend(g[:, None] * colour + (1 - g[:, None]) * grey for g in self.geometries)
        return torch.stack(rows).reshape(len(rows), -1) / 255

    def codebook(self, dim: int, generator: torch.Generator) -> torch.Tensor:
        """Unit codebook vectors (size, dim): codes that look alike point alike (the top principal
        components of their appearance), plus a seeded jitter that keeps every pair apart."""
        looks = self.appearances()
        looks = looks - looks.mean(0)
        _, _, components = torch.linalg.svd(looks, full_matrices=False)
        projected = looks @ components[:dim].T
        projected = projected / projected.std(0).clamp_min(1e-6)
        vectors = projected + 0.5 * torch.randn(projected.shape, generator=generator)
        return F.normalize(vectors, dim=1)


def fit_patch_codes(images, config: VQConfig, generator: torch.Generator, iterations: int = 30) -> PatchCodes:
    """A PatchCodes whose edge geometries are a k-means of the edge patches in `images` (each
    distinct mask once, so that the rare ones of small shapes get centroids of their own)."""
    backgrounds, colours = len(world.BACKGROUNDS), len(world.COLOURS)
    edge_shapes = (config.codebook_size - backgrounds) // colours - 1
    if edge_shapes < 1:
        raise ValueError(f"codebook_size must be at least {backgrounds + 2 * colours} "
                         f"(backgrounds + colours x (inside + one edge)), got {config.codebook_size}")
    probe = PatchCodes(torch.zeros(1, config.patch_size ** 2), config.patch_size)
    patches, _, _ = probe.coverage(images)
    patches = patches.reshape(-1, patches.shape[-1])
    mean = patches.mean(-1)
    edges = patches[(mean > PatchCodes.FLAT) & (mean < 1 - PatchCodes.FLAT)]
    edges = torch.unique(edges.mul(255).round(), dim=0) / 255
    if len(edges) == 0:
        raise ValueError("no edge patches to fit the codes on: too few images")
    # k-means++ seeding, then Lloyd's iterations; a cluster left empty takes the worst-fit patch
    centres = edges[torch.randint(len(edges), (1,), generator=generator)]
    while len(centres) < edge_shapes:
        nearest = torch.cdist(edges, centres).min(1).values.square()
        if float(nearest.sum()) == 0:  # fewer distinct masks than codes: repeat (the extra codes go unused)
            centres = torch.cat([centres, centres[:edge_shapes - len(centres)]])
            break
        centres = torch.cat([centres, edges[torch.multinomial(nearest, 1, generator=generator)]])
    for _ in range(iterations):
        distances = torch.cdist(edges, centres)
        assignment = distances.argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, assignment, edges)
        counts = torch.bincount(assignment, minlength=edge_shapes)
        for empty in (counts == 0).nonzero().flatten().tolist():
            worst = distances.min(1).values.argmax()
            sums[empty], counts[empty] = edges[worst], 1
            distances[worst] = 0
        centres = sums / counts[:, None]
    return PatchCodes(centres, config.patch_size)


def reconstruction_loss(reconstruction, pixels, foreground_weight: float):
    """Squared error with shape pixels weighted up. A shape covers 3-15% of the image; unweighted,
    the decoder spends its first few hundred steps on backgrounds. Shape pixels are those that
    differ from the image's corner pixel (ShapesWorld backgrounds are flat and shapes never reach
    the corner)."""
    background = pixels[:, :, :1, :1]
    foreground = ((pixels - background).abs().sum(dim=1, keepdim=True) > 0.1).float()
    weight = 1.0 + foreground_weight * foreground
    return ((reconstruction - pixels).square() * weight).sum() / (weight.sum() * pixels.shape[1])


def code_logits(vq, pixels, bf16: bool):
    """The encoder's dot product with every codebook vector at every patch, (N * patches, codes):
    its argmax is the code `vq.encode` gives (the codebook is on the unit sphere)."""
    with autocast(bf16):
        hidden = vq.quant_conv(vq.encoder(pixels))
    hidden = hidden.float().permute(0, 2, 3, 1).reshape(-1, hidden.shape[1])
    return hidden @ vq.quantize.embedding.weight.T


def train_vq(config: VQConfig | None = None, progress: bool = True):
    """Train a JanusVQVAE on rendered ShapesWorld images; returns (vq in eval mode, fp32; its PatchCodes).

    The codes come from the rule (`fit_patch_codes` on the training renders); the codebook is fixed
    (`PatchCodes.codebook`). Each step trains the decoder to draw a batch of renders from their
    codes, and the encoder to give those codes, at once.
    """
    from transformers.models.janus.modeling_janus import JanusVQVAE

    config = config or VQConfig()
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    images, _, _ = world.make_dataset(config.images, seed=config.seed, image_size=config.image_size)
    rule = fit_patch_codes(images, config, generator)
    codes = rule.codes(images)
    pixels = world.image_tensor(images)

    vq = JanusVQVAE(janus_config(len(shapes_tokenizer()), config).vq_config)
    # transformers draws every conv from N(0, 0.02), far too small for a conv net trained from
    # scratch (the decoder would take hundreds of steps to produce anything); torch's fan-in init.
    for module in vq.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.reset_parameters()
    with torch.no_grad():
        codebook = vq.quantize.embedding.weight
        codebook[:rule.size] = rule.codebook(config.embed_dim, generator)  # codes past rule.size go unused
        codebook[rule.size:] = F.normalize(torch.randn(codebook[rule.size:].shape, generator=generator), dim=1)
    vq.quantize.requires_grad_(False)
    vq.train()
    parameters = [p for p in vq.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, betas=(0.9, 0.99), weight_decay=0.0)

    bar = progress_bar(range(config.steps), progress, "VQ")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config.steps, config.learning_rate, config.warmup_steps)
        rows = torch.randint(len(pixels), (config.batch_size,), generator=generator)
        batch, batch_codes = pixels[rows], codes[rows]
        with autocast(config.bf16):
            reconstruction = vq.decode(batch_codes)
        pixel_loss = reconstruction_loss(reconstruction.float(), batch, config.foreground_weight)
        code_loss = F.cross_entropy(code_logits(vq, batch, config.bf16), batch_codes.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        (pixel_loss + config.code_weight * code_loss).backward()
        torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
        optimizer.step()
        if step % 10 == 0:
            bar.set_postfix(pixels=f"{pixel_loss.item():.4f}", codes=f"{code_loss.item():.3f}")
    vq.eval()
    return vq, rule


def encoder_accuracy(vq, rule: PatchCodes, n: int, seed: int) -> float:
    """Share of patches of fresh renders that `vq.encode` gives the rule's code."""
    images, _, _ = world.make_dataset(n, seed=seed, image_size=vq.config.resolution)
    return float((tokenize_images(vq, world.image_tensor(images)) == rule.codes(images)).float().mean())


@torch.no_grad()
def tokenize_images(vq, pixels, batch_size: int = 256):
    """Image tokens (N, grid * grid) through the model's own `encode`, in fp32."""
    tokens = [vq.encode(chunk).image_tokens.view(len(chunk), -1) for chunk in pixels.split(batch_size)]
    return torch.cat(tokens)


@torch.no_grad()
def vq_roundtrip(vq, pixels):
    """Images as the generator can show them: encoded to tokens and decoded again, in [-1, 1]."""
    return vq.decode(tokenize_images(vq, pixels)).float().clamp(-1, 1)


def roundtrip_images(vq, images):
    """uint8 N x S x S x 3 renders -> the same after a VQ round trip, uint8 (what a judge of generated images sees)."""
    pixels = torch.cat([vq_roundtrip(vq, chunk) for chunk in world.image_tensor(images).split(250)])
    return pixels.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


# ---------------------------------------------------------------- 2. the generator


def build_janus(vq, vq_config: VQConfig, config: GeneratorConfig, tokenizer):
    """A fresh JanusForConditionalGeneration with the trained VQ weights in model.model.vqmodel."""
    from transformers import JanusForConditionalGeneration

    torch.manual_seed(config.seed)
    model = JanusForConditionalGeneration(janus_config(len(tokenizer), vq_config, config))
    model.model.vqmodel.load_state_dict(vq.state_dict())
    # The image-token embeddings start at the VQ codebook vectors (same shape): codes that look
    # alike start close together instead of at random.
    with torch.no_grad():
        model.model.generation_embeddings.weight.copy_(vq.quantize.embedding.weight)
    return model


def prompt_batch(tokenizer, captions: list[str], unconditional_rows, device=None):
    """The Janus-template prompts for captions, with the chosen rows turned into the CFG
    unconditional prompt exactly as the sampler builds it (`model.unconditional`: every prompt
    token pad except BOS and <begin_of_image>, same length and attention mask)."""
    batch = encode_prompts(tokenizer, captions, device=device)
    blank = unconditional(batch, tokenizer)
    rows = unconditional_rows[:, None]
    batch.input_ids = torch.where(rows, blank.input_ids, batch.input_ids)
    return batch


def train_generator(vq, rule: PatchCodes, config: GeneratorConfig | None = None, progress: bool = True, *,
                    vq_config: VQConfig | None = None):
    """Train a tiny Janus to draw ShapesWorld captions as image tokens of `vq`, the codes of `rule`.

    Returns (model in eval mode, tokenizer). The loss is the teacher-forced cross-entropy of all
    64 image tokens in one pass (`image_hidden_states` -> `image_logits`, the same functions the
    erasure trainer uses), through earkit's masked_cross_entropy kernel.
    """
    from ...kernels import masked_cross_entropy

    config = config or GeneratorConfig()
    vq_config = vq_config or vq_config_of(vq)
    tokenizer = shapes_tokenizer()
    model = build_janus(vq, vq_config, config, tokenizer)

    # The training set: scenes rendered once and given their codes by the rule (which the VQ
    # encoder was trained to reproduce: its stray patch would be noise the generator learns).
    images, _, scenes = world.make_dataset(config.images, seed=config.seed + 1, image_size=vq_config.image_size)
    tokens = rule.codes(images)

    # Only the language model and the generation modules learn: the VQ model is frozen, the
    # ViT image encoder and the text head are not used to generate.
    model.requires_grad_(False)
    trainable = [model.model.language_model, model.model.generation_embeddings, model.model.generation_aligner,
                 model.model.generation_head]
    for module in trainable:
        module.requires_grad_(True)
    parameters = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in parameters if p.ndim >= 2]
    no_decay = [p for p in parameters if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=config.learning_rate, betas=(0.9, 0.95))
    caption_rng = random.Random(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model.train()

    bar = progress_bar(range(config.steps), progress, "generator")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config.steps, config.learning_rate, config.warmup_steps,
                                        config.min_learning_rate)
        rows = torch.randint(len(tokens), (config.batch_size,), generator=generator)
        captions = [world.caption(scenes[i], caption_rng) for i in rows.tolist()]
        blank = torch.rand(config.batch_size, generator=generator) < config.unconditional_probability
        prompts = prompt_batch(tokenizer, captions, blank)
        targets = tokens[rows]
        logits = image_logits(model, image_hidden_states(model, prompts, targets))
        loss = masked_cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
        optimizer.step()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % 100 == 99 and not progress:
            print(step, f"{loss.item():.3f}", flush=True)
    model.requires_grad_(False)
    model.eval()
    return model, tokenizer


def vq_config_of(vq) -> VQConfig:
    """The VQConfig fields a trained JanusVQVAE's own config determines."""
    c = vq.config
    return VQConfig(image_size=c.resolution, patch_size=c.resolution // c.num_patches,
                    codebook_size=c.num_embeddings, embed_dim=c.embed_dim, base_channels=c.base_channels)


# ---------------------------------------------------------------- 3. build and save


def folder_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


# ShapesWorld's generator is sampled with light guidance at a middling temperature. Measured on a
# build of the shipped recipe (60 prompts per shape, share drawn as asked): guidance 1 / temperature
# 1 (the model's own distribution) 97.3%, 1.5 / 0.5 98.0%, 1.5 / 0.2 98.3%, 2 / 0.2 82%; at 1 /
# 0.2, 79%: a low temperature with little guidance leaves many images empty, since where a shape
# starts is spread over a few dozen positions and each of them alone is less likely than more
# background. Guidance much above 2 extrapolates from the weak unconditional prediction (10% of
# training rows) and tears shapes apart. The two go into the folder's generation_config.json,
# where any Hugging Face model states its own sampling and earkit's sampler reads it.
def set_sampling(model):
    """ShapesWorld's guidance scale and temperature as the model's own (its generation_config)."""
    config = model.generation_config
    config.do_sample, config.guidance_scale, config.temperature = True, GUIDANCE_SCALE, TEMPERATURE
    return model


def write_model_files(folder, default_judge: str | None = None) -> None:
    """What a generator folder tells the generic engine beside its model: prompt_vocabulary.json
    (the caption templates and their words, for the template pair backend) and, when given, the
    default judge in earkit.json (a judge form, paths relative to the folder)."""
    folder = Path(folder)
    vocabulary = json.dumps(world.prompt_vocabulary(), indent=2)
    (folder / world.PROMPT_VOCABULARY).write_text(vocabulary + "\n")
    if default_judge is not None:
        write_model_notes(folder, default_judge=default_judge)


def build_generator(out_folder, vq_config: VQConfig | None = None, generator_config: GeneratorConfig | None = None,
                    progress: bool = True, default_judge: str | None = None) -> Path:
    """Train the VQ model and the generator, and save them as one from_pretrained folder.

    The folder holds the model (fp32 safetensors: loads with `load_janus`; ShapesWorld's sampling
    in generation_config.json), the tokenizer, prompt_vocabulary.json, earkit.json naming
    `default_judge` when given (build_world gives the world's judge) and world.json (both
    configs, the seeds, the training times, the folder size). It is written to
    a temporary folder beside out_folder and renamed into place, so a crash leaves nothing half
    written; an existing out_folder is replaced only when it holds nothing but an earlier build.
    """
    check_replaceable(out_folder, force=True, kind="shapesworld generator", what="generator folder")  # before training
    vq_config = vq_config or VQConfig()
    generator_config = generator_config or GeneratorConfig()
    torch_threads = torch.get_num_threads()
    start = time.perf_counter()
    vq, rule = train_vq(vq_config, progress=progress)
    vq_seconds = time.perf_counter() - start
    model, tokenizer = train_generator(vq, rule, generator_config, progress=progress, vq_config=vq_config)
    generator_seconds = time.perf_counter() - start - vq_seconds

    def write_into(folder: Path) -> None:
        set_sampling(model).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        rule.save(folder)
        write_model_files(folder, default_judge)
        record = {
            "what": "ShapesWorld generator: a tiny JanusForConditionalGeneration trained by earkit.engine.shapesworld.generator",
            "vq_config": asdict(vq_config),
            "generator_config": asdict(generator_config),
            "seeds": {"vq": vq_config.seed, "generator": generator_config.seed},
            "training_seconds": {"vq": round(vq_seconds, 1), "generator": round(generator_seconds, 1),
                                 "total": round(vq_seconds + generator_seconds, 1)},
            "vq_encoder_accuracy": round(encoder_accuracy(vq, rule, n=200, seed=vq_config.seed + 7), 4),
            "torch_threads": torch_threads,
            "torch": torch.__version__,
        }
        record["folder_bytes"] = folder_size(folder)  # without world.json itself
        (folder / "world.json").write_text(json.dumps(record, indent=2) + "\n")

    out_folder = write_folder_atomically(out_folder, write_into, force=True, kind="shapesworld generator",
                                         what="generator folder")
    return out_folder
