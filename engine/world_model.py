"""The ShapesWorld generator: a tiny Janus that earkit trains itself, on a 2-core CPU, in minutes.

Nothing can be downloaded here, so the default model that `earkit erase` works on is built from
scratch out of the real transformers classes (DESIGN.md, "ShapesWorld: the embedded default"):

    1. train_vq         a JanusVQVAE image tokenizer for 64 x 64 ShapesWorld images: 8 x 8 patches,
                        so 64 image tokens per image, from a small codebook
    2. train_generator  a JanusForConditionalGeneration (a Llama of a few layers) whose generation
                        head learns to draw captions as those 64 tokens, teacher-forced, through
                        earkit's own masked_cross_entropy kernel; ~10% of rows train the
                        unconditional prompt, so that classifier-free guidance works
    3. build_generator  both, saved as one from_pretrained folder with its word-level tokenizer
                        and a world.json (configs, seeds, training times)

    folder = build_generator("world_generator/")
    model, tokenizer = load_janus(folder)
    images = decode_images(model, sample_image_tokens(model, tokenizer, ["a red star"]))

Everything is deterministic from the seeds in the configs (on a given machine and thread count).
The defaults fit the budget: VQ + generator training within 10 minutes on 2 CPU cores, a saved
folder under 20 MB. `tiny_budget()` gives configs of a handful of steps for tests.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import world
from .model import encode_prompts, image_hidden_states, image_logits, unconditional
from .tiny import tiny_janus_config, word_tokenizer

# ---------------------------------------------------------------- configs


@dataclass
class VQConfig:
    seed: int = 0
    images: int = 4000  # rendered training pool; batches are drawn from it at random
    image_size: int = 64
    patch_size: int = 8  # 64 / 8 = an 8 x 8 grid of 64 image tokens
    # Few codes: with 512, k-means gave the flat backgrounds (most of every image) dozens of
    # near-identical codes each, and the generator had to learn which of them comes next.
    codebook_size: int = 64
    embed_dim: int = 8  # codebook vectors live on the unit sphere of this dimension
    base_channels: int = 32  # the smallest GroupNorm(32) allows; cost is dominated by the 64 x 64 level
    steps: int = 1200
    batch_size: int = 8
    learning_rate: float = 5e-4
    warmup_steps: int = 50
    grad_clip: float = 1.0
    autoencoder_fraction: float = 0.3  # the first steps train without quantization (see train_vq)
    foreground_weight: float = 3.0  # extra loss weight on shape pixels (see reconstruction_loss)
    restart_every: int = 50  # re-seed codes left unused for this many steps
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
    vq = VQConfig(images=16, steps=4, batch_size=4, warmup_steps=1, restart_every=2)
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
# Janus's VQ model quantizes the encoder output to the nearest codebook vector (plain squared
# distance, in `encode`), but `decode` looks tokens up with `get_codebook_entry`, which
# l2-normalises the codebook vector first. Keeping every codebook vector on the unit sphere makes
# the two agree: then the nearest vector is the one with the largest dot product, whatever the
# length of the encoder output, and normalising changes nothing on the way back. So training
# normalises the encoder output too (LlamaGen's l2-normalised codes, which also keep codebook
# usage high) and re-normalises the codebook after every optimizer step; the trained model then
# encodes and decodes through its own `encode` / `decode` exactly as it was trained.


def unit_codebook_(vq) -> None:
    with torch.no_grad():
        weight = vq.quantize.embedding.weight
        weight.copy_(F.normalize(weight, dim=1))


def latents(vq, pixels, bf16: bool):
    """Encoder output on the unit sphere, (B, embed_dim, grid, grid), fp32."""
    with autocast(bf16):
        hidden = vq.quant_conv(vq.encoder(pixels))
    return F.normalize(hidden.float(), dim=1)


def reconstruct(vq, pixels, *, quantize: bool, bf16: bool):
    """(reconstruction, embedding loss, codes). Quantized, it is the model's own path: the
    quantizer's straight-through estimate and embedding loss, and the decoder on unit codes."""
    z = latents(vq, pixels, bf16)
    if quantize:
        z, embedding_loss, codes = vq.quantize(z)  # nearest code, outside autocast: fp32 distances
    else:
        embedding_loss, codes = z.new_zeros(()), None
    with autocast(bf16):
        reconstruction = vq.decoder(vq.post_quant_conv(z))
    return reconstruction.float(), embedding_loss, codes


def reconstruction_loss(reconstruction, pixels, foreground_weight: float):
    """Squared error with shape pixels weighted up. A shape covers 3-15% of the image; unweighted,
    the decoder spends its first few hundred steps on backgrounds. Shape pixels are those that
    differ from the image's corner pixel (ShapesWorld backgrounds are flat and shapes never reach
    the corner)."""
    background = pixels[:, :, :1, :1]
    foreground = ((pixels - background).abs().sum(dim=1, keepdim=True) > 0.1).float()
    weight = 1.0 + foreground_weight * foreground
    return ((reconstruction - pixels).square() * weight).sum() / (weight.sum() * pixels.shape[1])


@torch.no_grad()
def init_codebook_(vq, pixels, generator, bf16: bool, iterations: int = 10) -> None:
    """Spherical k-means of the autoencoder's latents: the codebook starts where the data is,
    so no code starts dead and the decoder's input barely moves when quantization switches on."""
    points = torch.cat([latents(vq, chunk, bf16) for chunk in pixels.split(64)])
    points = points.permute(0, 2, 3, 1).reshape(-1, points.shape[1])
    size = vq.quantize.embedding.weight.shape[0]
    centres = points[torch.randperm(len(points), generator=generator)[:size]].clone()
    for _ in range(iterations):
        assignment = (points @ centres.T).argmax(dim=1)
        sums = torch.zeros_like(centres).index_add_(0, assignment, points)
        counts = torch.bincount(assignment, minlength=size)
        empty = counts == 0  # re-seed an empty cluster on a random point
        sums[empty] = points[torch.randint(len(points), (int(empty.sum()),), generator=generator)]
        centres = F.normalize(sums, dim=1)
    vq.quantize.embedding.weight.copy_(centres)


@torch.no_grad()
def restart_dead_codes_(vq, z, usage, generator) -> int:
    """Codes no latent picked since the last restart move onto random latents of this batch."""
    dead = (usage == 0).nonzero().squeeze(1)
    if len(dead):
        points = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        picks = points[torch.randint(len(points), (len(dead),), generator=generator)]
        noise = 0.01 * torch.randn(picks.shape, generator=generator)
        vq.quantize.embedding.weight[dead] = F.normalize(picks + noise, dim=1)
    usage.zero_()
    return len(dead)


def train_vq(config: VQConfig | None = None, progress: bool = True):
    """Train a JanusVQVAE on rendered ShapesWorld images; returns it in eval mode (fp32).

    Two phases: for the first `autoencoder_fraction` of the steps it trains as a plain
    autoencoder on unit latents (the decoder learns to draw before it has to share 512 codes),
    then the codebook is set to a k-means of the latents and training goes on quantized, with
    the quantizer's own embedding loss added to the reconstruction loss.
    """
    from transformers.models.janus.modeling_janus import JanusVQVAE

    config = config or VQConfig()
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    images, _, _ = world.make_dataset(config.images, seed=config.seed, image_size=config.image_size)
    pixels = world.image_tensor(images)

    vq = JanusVQVAE(janus_config(len(shapes_tokenizer()), config).vq_config)
    # transformers draws every conv from N(0, 0.02), far too small for a conv net trained from
    # scratch (the decoder would take hundreds of steps to produce anything); torch's fan-in init.
    for module in vq.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.reset_parameters()
    unit_codebook_(vq)
    vq.train()
    optimizer = torch.optim.AdamW(vq.parameters(), lr=config.learning_rate, betas=(0.9, 0.99), weight_decay=0.0)
    autoencoder_steps = int(config.steps * config.autoencoder_fraction)
    usage = torch.zeros(config.codebook_size, dtype=torch.long)

    bar = progress_bar(range(config.steps), progress, "VQ")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config.steps, config.learning_rate, config.warmup_steps)
        if step == autoencoder_steps:
            init_codebook_(vq, pixels[torch.randperm(len(pixels), generator=generator)[:256]], generator, config.bf16)
        batch = pixels[torch.randint(len(pixels), (config.batch_size,), generator=generator)]
        quantize = step >= autoencoder_steps
        reconstruction, embedding_loss, codes = reconstruct(vq, batch, quantize=quantize, bf16=config.bf16)
        pixel_loss = reconstruction_loss(reconstruction, batch, config.foreground_weight)
        loss = pixel_loss + embedding_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vq.parameters(), config.grad_clip)
        optimizer.step()
        unit_codebook_(vq)
        if quantize:
            usage += torch.bincount(codes, minlength=config.codebook_size)
            quantized_steps = step - autoencoder_steps + 1
            # Restarts stop for the last quarter: the decoder needs the final codes to settle.
            if quantized_steps % config.restart_every == 0 and step < config.steps * 0.75:
                z = latents(vq, batch, config.bf16).detach()
                restart_dead_codes_(vq, z, usage, generator)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{pixel_loss.item():.4f}", vq=f"{embedding_loss.item():.4f}")
    vq.eval()
    return vq


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


def train_generator(vq, config: GeneratorConfig | None = None, progress: bool = True, *,
                    vq_config: VQConfig | None = None):
    """Train a tiny Janus to draw ShapesWorld captions as image tokens of `vq`.

    Returns (model in eval mode, tokenizer). The loss is the teacher-forced cross-entropy of all
    64 image tokens in one pass (`image_hidden_states` -> `image_logits`, the same functions the
    erasure trainer uses), through earkit's masked_cross_entropy kernel.
    """
    from ..kernels import masked_cross_entropy

    config = config or GeneratorConfig()
    vq_config = vq_config or vq_config_of(vq)
    tokenizer = shapes_tokenizer()
    model = build_janus(vq, vq_config, config, tokenizer)

    # The training set: scenes rendered once and tokenized by the trained VQ model.
    images, _, scenes = world.make_dataset(config.images, seed=config.seed + 1, image_size=vq_config.image_size)
    tokens = tokenize_images(vq, world.image_tensor(images))

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


def build_generator(out_folder, vq_config: VQConfig | None = None, generator_config: GeneratorConfig | None = None,
                    progress: bool = True) -> Path:
    """Train the VQ model and the generator, and save them as one from_pretrained folder.

    The folder holds the model (fp32 safetensors: loads with `load_janus`), the tokenizer and
    world.json (both configs, the seeds, the training times, the folder size). It is written to
    a temporary folder beside out_folder and renamed into place, so a crash leaves nothing half
    written; an existing out_folder is replaced.
    """
    vq_config = vq_config or VQConfig()
    generator_config = generator_config or GeneratorConfig()
    torch_threads = torch.get_num_threads()
    start = time.perf_counter()
    vq = train_vq(vq_config, progress=progress)
    vq_seconds = time.perf_counter() - start
    model, tokenizer = train_generator(vq, generator_config, progress=progress, vq_config=vq_config)
    generator_seconds = time.perf_counter() - start - vq_seconds

    out_folder = Path(out_folder)
    out_folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{out_folder.name}.partial-", dir=out_folder.parent))
    try:
        model.save_pretrained(temporary)
        tokenizer.save_pretrained(temporary)
        record = {
            "what": "ShapesWorld generator: a tiny JanusForConditionalGeneration trained by earkit.engine.world_model",
            "vq_config": asdict(vq_config),
            "generator_config": asdict(generator_config),
            "seeds": {"vq": vq_config.seed, "generator": generator_config.seed},
            "training_seconds": {"vq": round(vq_seconds, 1), "generator": round(generator_seconds, 1),
                                 "total": round(vq_seconds + generator_seconds, 1)},
            "torch_threads": torch_threads,
            "torch": torch.__version__,
        }
        record["folder_bytes"] = folder_size(temporary)  # without world.json itself
        (temporary / "world.json").write_text(json.dumps(record, indent=2) + "\n")
        temporary.chmod(0o755)  # mkdtemp makes it private; a shipped or shared world must be readable
        if out_folder.exists():
            shutil.rmtree(out_folder)
        temporary.rename(out_folder)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return out_folder
