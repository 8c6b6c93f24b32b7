"""Janus models and tokenizers that earkit builds itself: tiny ones for tests (and the pieces a
small world such as ShapesWorld builds its generator from), and the real Janus-Pro shapes with
random weights for benchmarks (no download anywhere). Nothing here is specific to one world.

The models are the real transformers classes (JanusForConditionalGeneration) with smaller
widths; the tokenizer is a word-level `tokenizers` model with Janus-Pro's special tokens, so
every code path that serves Janus-Pro serves these too.
"""

from __future__ import annotations

import os
import re

import torch

BOS, EOS, PAD, UNK = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<unk>"
JANUS_SPECIAL_TOKENS = ["<|User|>", "<|Assistant|>", "<begin_of_image>", "<end_of_image>", "<image_placeholder>"]
BASIC_WORDS = ["a", "an", "the", "of", "in", "on", "with", "and", "photo", "picture", "image", ":", ".", ","]


# earkit's one rule for splitting text into words: runs of word characters, and each punctuation
# mark alone. The word-level tokenizers split this way, and so does ECGVF's prompt-pair check.
WORD = re.compile(r"\w+|[^\w\s]")


def words_of(texts) -> list[str]:
    """Lower-cased words and punctuation marks, as the word-level tokenizer splits them."""
    return [word for text in texts for word in WORD.findall(text.lower())]


def word_tokenizer(vocabulary):
    """A PreTrainedTokenizerFast over whole words with the Janus-Pro special tokens.

    Unknown words map to <unk>; BOS is prepended; `boi_token` / `eoi_token` / `image_token` are
    set as on the Janus-Pro tokenizer.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    special = [BOS, EOS, PAD, UNK] + JANUS_SPECIAL_TOKENS
    words = sorted(set(BASIC_WORDS) | set(vocabulary) - set(special))
    vocab = {token: index for index, token in enumerate(special + words)}
    backend = Tokenizer(WordLevel(vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    backend.add_special_tokens(special)
    backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        padding_side="left", extra_special_tokens={
            "image_token": "<image_placeholder>", "boi_token": "<begin_of_image>", "eoi_token": "<end_of_image>",
        },
    )
    return tokenizer


def tiny_janus_config(vocab_size: int, *, hidden_size: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                      image_size: int = 32, patch_size: int = 8, codebook_size: int = 128, vq_embed_dim: int = 8,
                      vq_base_channels: int = 32):
    """A JanusConfig of the real architecture at toy widths.

    Image tokens = (image_size / patch_size)^2; the VQ decoder upsamples by 2^(levels - 1), so
    it gets log2(patch_size) + 1 channel levels to decode back to image_size.
    """
    from transformers import JanusConfig

    levels = patch_size.bit_length()  # patch 8 -> 4 levels -> 3 upsamplings
    if 2 ** (levels - 1) != patch_size:
        raise ValueError(f"patch_size must be a power of two, got {patch_size}")
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    grid = image_size // patch_size
    return JanusConfig(
        text_config=dict(
            model_type="llama", hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab_size,
            max_position_embeddings=512, rms_norm_eps=1e-6,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=image_size,
            patch_size=patch_size, projection_dim=hidden_size, num_image_tokens=grid * grid,
        ),
        vq_config=dict(
            embed_dim=vq_embed_dim, num_embeddings=codebook_size, base_channels=vq_base_channels,
            channel_multiplier=[1] * (levels - 2) + [2, 2] if levels >= 2 else [1],
            projection_dim=hidden_size, image_token_embed_dim=hidden_size, num_patches=grid, resolution=image_size,
            latent_channels=vq_embed_dim, num_res_blocks=1,
        ),
        tie_word_embeddings=False,
    )


def janus_pro_config(size: str):
    """The Janus-Pro-1B or -7B architecture (for random-weight benchmarks: no download)."""
    from transformers import JanusConfig

    text = {
        "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
                   num_key_value_heads=16),
        "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=30, num_attention_heads=32,
                   num_key_value_heads=32),
    }
    if size not in text:
        raise ValueError(f"size must be 1b or 7b, got {size!r}")
    hidden = text[size]["hidden_size"]
    return JanusConfig(
        text_config=dict(model_type="llama", vocab_size=102400, max_position_embeddings=16384, rms_norm_eps=1e-6,
                         **text[size]),
        vision_config=dict(image_size=384, patch_size=16, projection_dim=hidden, num_image_tokens=576),
        vq_config=dict(embed_dim=8, num_embeddings=16384, projection_dim=hidden, image_token_embed_dim=hidden,
                       num_patches=24, resolution=384),
        tie_word_embeddings=False,
    )


def build_tiny_janus(vocabulary, seed: int = 0, **config):
    """A randomly initialised tiny Janus and its word-level tokenizer (deterministic from seed)."""
    from transformers import JanusForConditionalGeneration

    tokenizer = word_tokenizer(vocabulary)
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(tiny_janus_config(len(tokenizer), **config))
    model.eval()
    return model, tokenizer


def save_tiny_janus(folder: str | os.PathLike, vocabulary, seed: int = 0, **config):
    """Write a tiny random Janus folder that from_pretrained and AutoTokenizer load."""
    model, tokenizer = build_tiny_janus(vocabulary, seed, **config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model, tokenizer


def sharpen(model, seed: int = 1):
    """Redraw a tiny Janus's text model, image embeddings and head at unit gain (std 1/sqrt(fan_in)).

    At the default init (std 0.02) attention is nearly uniform and the logits ~0.01, so a wrong
    position id or cache slot changes the logits by ~1e-4, inside any tolerance, and sampling
    hardly at all; at unit gain it changes them by ~1, and equality checks (the sampler against
    transformers, the CUDA-graph sampler against the eager one) can tell right from wrong."""
    import math

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.startswith(("model.vqmodel", "model.vision_model")):
                continue  # the VQ decoder and image encoder keep their init
            if isinstance(module, torch.nn.Linear):
                scale = 1 / math.sqrt(module.in_features)
                module.weight.copy_((torch.randn(module.weight.shape, generator=generator) * scale).to(module.weight))
            elif isinstance(module, torch.nn.Embedding):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator).to(module.weight))
    return model
