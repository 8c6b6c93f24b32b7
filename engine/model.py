"""Janus-Pro as earkit uses it: loading, the one prompt template, and the teacher-forced pass.

Janus draws an image as T discrete VQ tokens (T = 576 for Janus-Pro: a 24 x 24 grid in raster
order) after the prompt and `<begin_of_image>`. Sampling (sampler.py) feeds them one at a time
through a KV cache; training runs all T positions in one teacher-forced pass (DESIGN.md, "The
method"). Both go through the functions here, so the prompt template, the padding and the
positions are the same in both, which is what makes the teacher-forced logits equal the
sampler's (tests/engine/test_sampler.py checks it).
"""

from __future__ import annotations

import contextlib
import importlib.util
import inspect
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

# The Janus-Pro chat format for image generation, as its processor writes it; the
# `<begin_of_image>` tag follows. The released EAR code used a different template for training
# and for sampling; earkit uses this one function everywhere.
PROMPT_TEMPLATE = "<|User|>: {prompt}\n\n<|Assistant|>:"
BOI_TOKEN = "<begin_of_image>"

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def prompt_text(prompt: str, boi_token: str = BOI_TOKEN) -> str:
    """The exact text a prompt becomes before tokenisation (BOS is added by the tokenizer)."""
    return PROMPT_TEMPLATE.format(prompt=prompt.strip()) + boi_token


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_device(device: str | torch.device | None) -> torch.device:
    """The device a --device text names, checked before any weight is read: ValueError naming it
    when torch does not know it or this machine does not have it (cuda:7 on a one-GPU machine)."""
    if device is None:
        return default_device()
    if isinstance(device, torch.device):
        parsed = device
    else:
        if not isinstance(device, str) or not device.strip():
            raise ValueError(f"device must be a device name like cpu, cuda or cuda:1, got {device!r}")
        try:
            parsed = torch.device(device.strip())
        except (RuntimeError, ValueError):
            raise ValueError(f"device {device!r} is not a device name (expected cpu, cuda, cuda:N or mps)") from None
    if parsed.type == "cpu":
        return parsed
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {str(parsed)!r}: this machine has no usable CUDA device (use --device cpu)")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"device {str(parsed)!r}: this machine has {count} CUDA device(s), "
                             f"cuda:0..cuda:{count - 1}")
        return parsed
    if parsed.type == "mps" and torch.backends.mps.is_available():
        return parsed
    raise ValueError(f"device {str(parsed)!r} is not available here (expected cpu or cuda)")


# A language model this narrow (ShapesWorld's is 128 wide) gives every op a few microseconds of
# work: a second CPU thread buys 20% alone and costs 3-10x beside other jobs, since each op's
# OpenMP region waits at its barrier for whichever thread the scheduler parked (bench/load.py).
SMALL_MODEL_HIDDEN_SIZE = 512


def cpu_threads_for(source, device=None) -> int | None:
    """The intra-op CPU threads worth using for a model folder: 1 for a small model on the CPU,
    None (leave torch's default) otherwise, for a hub id, or when it cannot tell. Reads only the
    folder's config.json, so it is decided before any weight loads."""
    from earkit.io import parse_json

    if device is not None and torch.device(device).type != "cpu":
        return None
    if device is None and default_device().type != "cpu":
        return None
    try:
        path = Path(os.fspath(source)).expanduser() / "config.json"
        config = parse_json(path.read_text(encoding="utf-8"), str(path))
        hidden = (config.get("text_config") or config).get("hidden_size")
    except (OSError, ValueError, AttributeError, TypeError):
        return None
    if isinstance(hidden, int) and not isinstance(hidden, bool) and 0 < hidden <= SMALL_MODEL_HIDDEN_SIZE:
        return 1
    return None


@contextlib.contextmanager
def cpu_threads(count: int | None):
    """torch's (and so the native twin's) intra-op CPU threads set to `count` inside, restored after."""
    if count is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def attention_implementation(device: torch.device | str) -> str:
    """flash_attention_2 when flash_attn imports and the model is on CUDA, else sdpa."""
    if torch.device(device).type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)} or 'auto', got {dtype!r}")
    return DTYPES[dtype]


def check_model_source(source: str | os.PathLike) -> str:
    """A local folder, or a hub id of the form owner/name; anything that looks like a path must exist."""
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model folder {path} has no config.json")
        return str(path)
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~")) and not text.endswith("/")
    if not looks_like_hub_id:
        raise FileNotFoundError(f"model folder {text} does not exist (and it is not a hub id like owner/name)")
    return text


def load_janus(source: str | os.PathLike, *, dtype: str | torch.dtype | None = "auto", device: str | None = None,
               load_in_8bit: bool = False, attn_implementation: str | None = None):
    """Load JanusForConditionalGeneration and its tokenizer from a local folder or a hub id.

    With HF_HUB_OFFLINE=1 a local folder loads without any network. `load_in_8bit` keeps the
    frozen weights in 8 bits (bitsandbytes, CUDA only); the trainable modules are copied to the
    compute dtype by the trainer.
    """
    from transformers import AutoTokenizer, JanusForConditionalGeneration

    source = check_model_source(source)
    device = check_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    kwargs = dict(dtype=torch_dtype, attn_implementation=attn_implementation or attention_implementation(device))
    if load_in_8bit:
        if device.type != "cuda":
            raise ValueError("load_in_8bit needs a CUDA device (bitsandbytes' 8-bit matmul)")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": device.index or 0}
    model = JanusForConditionalGeneration.from_pretrained(source, **kwargs)
    if not load_in_8bit:
        model.to(device)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    return model, tokenizer


# What earkit reads about a model from its own folder, beside the Hugging Face files: which judge
# measures its concepts when no --judge is given ("default_judge": a judge form such as
# "shapesworld:../judge", paths relative to the model folder). Sampling defaults are not here:
# they are the model's generation_config.json (guidance_scale, temperature), as for any HF model.
MODEL_NOTES = "earkit.json"
MODEL_NOTES_FORMAT = "earkit-model-notes"


def read_model_notes(model_folder) -> dict:
    """The model folder's earkit.json as a dict; {} for a hub id or a folder without one."""
    from earkit.io import parse_json, read_text_file

    if model_folder is None:
        return {}
    path = Path(model_folder).expanduser() / MODEL_NOTES
    if not path.is_file():
        return {}
    text = read_text_file(path, "model notes")  # its own errors name the file (empty, not UTF-8)
    try:
        notes = parse_json(text, str(path))
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(notes, dict) or notes.get("format") != MODEL_NOTES_FORMAT:
        raise ValueError(f"{path} is not earkit model notes (expected an object with format {MODEL_NOTES_FORMAT!r})")
    return notes


def rebased_judge(spec: str, base_folder) -> str:
    """A default_judge form (shapesworld:DIR, resnet50:WEIGHTS, openclip:NAME:WEIGHTS, nudenet)
    whose relative path, read against base_folder, is made absolute: what a copy of the notes in
    another folder (an export) must hold to name the same judge."""
    kind, _, rest = spec.partition(":")
    if not rest or kind not in ("shapesworld", "resnet50", "openclip"):
        return spec
    head, path = ("", rest) if kind != "openclip" else (rest.rpartition(":")[0] + ":", rest.rpartition(":")[2])
    if not path or os.path.isabs(os.path.expanduser(path)):
        return spec
    return f"{kind}:{head}{os.path.normpath(Path(base_folder).expanduser().absolute() / path)}"


def write_model_notes(model_folder, **notes) -> Path:
    """Write earkit.json into a model folder (e.g. default_judge="shapesworld:../judge")."""
    import json

    path = Path(model_folder) / MODEL_NOTES
    record = {"format": MODEL_NOTES_FORMAT, "version": 1, **notes}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


# ---------------------------------------------------------------- prompts


@dataclass
class PromptBatch:
    """Left-padded prompt ids (ending in <begin_of_image>) and their attention mask."""

    input_ids: Tensor  # (B, P) int64
    attention_mask: Tensor  # (B, P) int64, 0 on left padding

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    def to(self, device) -> "PromptBatch":
        return PromptBatch(self.input_ids.to(device), self.attention_mask.to(device))


def special_token_ids(tokenizer) -> dict[str, int]:
    boi = getattr(tokenizer, "boi_token", None) or BOI_TOKEN
    ids = {
        "bos": tokenizer.bos_token_id,
        "pad": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        "boi": tokenizer.convert_tokens_to_ids(boi),
    }
    missing = [name for name, value in ids.items() if value is None or value == tokenizer.unk_token_id]
    if missing:
        raise ValueError(f"tokenizer lacks the Janus special token(s) {missing}")
    return ids


def encode_prompts(tokenizer, prompts: list[str], device=None) -> PromptBatch:
    """Tokenise prompts in the Janus-Pro template, left-padded so that every prompt ends at the
    same column and image token t sits at column P + t in every row."""
    if isinstance(prompts, str):
        prompts = [prompts]
    if not prompts:
        raise ValueError("prompts is empty")
    ids = special_token_ids(tokenizer)
    boi = getattr(tokenizer, "boi_token", None) or BOI_TOKEN
    rows = [tokenizer(prompt_text(p, boi), add_special_tokens=True)["input_ids"] for p in prompts]
    if tokenizer.unk_token_id is not None and any(tokenizer.unk_token_id in row for row in rows):
        warn_unknown_words(tokenizer, [p for p, row in zip(prompts, rows) if tokenizer.unk_token_id in row])
    rows = [row if row[0] == ids["bos"] else [ids["bos"]] + row for row in rows]
    batch = left_padded(rows, ids["pad"])
    return batch.to(device) if device is not None else batch


def left_padded(rows: list[list[int]], pad: int) -> PromptBatch:
    """Token id rows as one batch, left-padded with `pad` so that every row ends at the last column."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row):] = 1
    return PromptBatch(input_ids, attention_mask)


_warned_prompts: set[str] = set()


def unknown_words(tokenizer, prompt: str) -> list[str]:
    """The words of a prompt that the tokenizer turns into its unknown token."""
    encoded = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    return [prompt[start:end] for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"])
            if token == tokenizer.unk_token_id]


def warn_unknown_words(tokenizer, prompts: list[str]) -> None:
    """A word-level tokenizer (e.g. ShapesWorld's) maps words it never saw to <unk>: the image then
    follows the rest of the prompt, which a user asking for "a purple hexagon" must be told."""
    for prompt in prompts:
        if prompt in _warned_prompts:
            continue
        _warned_prompts.add(prompt)
        try:
            words = unknown_words(tokenizer, prompt)
        except (NotImplementedError, TypeError, ValueError):  # a slow tokenizer has no offsets
            words = []
        named = ", ".join(repr(word) for word in dict.fromkeys(words)) if words else "some of its words"
        warnings.warn(f"prompt {prompt!r}: the model's tokenizer does not know {named}; they become its unknown "
                      "token and the image follows the rest of the prompt", UserWarning, stacklevel=3)


def unconditional(batch: PromptBatch, tokenizer, pad_id: int | None = None) -> PromptBatch:
    """The CFG unconditional row: every prompt token becomes pad except BOS and <begin_of_image>
    (still attended, as the reference sampler does). pad_id: the pad the model's generation config
    names (cfg_pad_id); None: the tokenizer's."""
    ids = special_token_ids(tokenizer)
    pad = ids["pad"] if pad_id is None else pad_id
    keep = (batch.input_ids == ids["bos"]) | (batch.input_ids == ids["boi"]) | (batch.attention_mask == 0)
    return PromptBatch(torch.where(keep, batch.input_ids, pad), batch.attention_mask)


def cfg_pad_id(model, tokenizer) -> int:
    """The token the CFG unconditional row is made of: the model's generation_config.pad_token_id,
    as transformers' Janus `generate` uses it, when it names a token the model embeds; else the
    tokenizer's pad (which Janus-Pro's files may not agree with: the generation config wins)."""
    configured = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
    if isinstance(configured, (list, tuple)):
        configured = configured[0] if configured else None
    vocabulary = model.get_input_embeddings().num_embeddings
    if isinstance(configured, int) and not isinstance(configured, bool) and 0 <= configured < vocabulary:
        return configured
    return special_token_ids(tokenizer)["pad"]


def positions(attention_mask: Tensor) -> Tensor:
    """Position ids that skip left padding, so a padded prompt sees the positions an unpadded one would."""
    return (attention_mask.cumsum(-1) - 1).clamp_min(0)


def cache_keyword(language_model) -> str:
    """transformers renamed past_key_values to cache (5.2x); the GPU machines run 5.17."""
    parameters = inspect.signature(language_model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


# ---------------------------------------------------------------- the teacher-forced pass


def image_token_count(model) -> int:
    return model.config.vision_config.num_image_tokens


def image_hidden_states(model, prompts: PromptBatch, image_tokens: Tensor) -> Tensor:
    """Last hidden states at the T positions that predict image tokens 0..T-1, in one pass.

    The sequence is prompt (ending in <begin_of_image>) + image tokens 0..T-2; the state at
    <begin_of_image> predicts token 0 and the state at token t-1 predicts token t.
    """
    return embedded_image_hidden_states(model, model.get_input_embeddings()(prompts.input_ids), prompts.attention_mask,
                                        image_tokens)


def embedded_image_hidden_states(model, prompt_embeds: Tensor, attention_mask: Tensor, image_tokens: Tensor) -> Tensor:
    """image_hidden_states from the prompt's input embeddings (B, P, H) instead of its ids: what a
    prompt attack (engine/attacks.py) differentiates through, with some rows' embeddings its own."""
    language_model = model.model.language_model
    image_embeds = model.prepare_embeddings_for_image_generation(image_tokens[:, :-1])
    embeds = torch.cat([prompt_embeds, image_embeds.to(prompt_embeds.dtype)], dim=1)
    mask = torch.cat([attention_mask, attention_mask.new_ones(image_tokens[:, :-1].shape)], dim=1)
    output = language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions(mask), use_cache=False)
    return output.last_hidden_state[:, prompt_embeds.shape[1] - 1:, :]


def generation_features(model, hidden: Tensor) -> Tensor:
    """The generation head up to its last Linear (vision_head): GELU(proj_out(h))."""
    head = model.model.generation_head
    return head.activation_fn(head.proj_out(hidden))


def image_logits(model, hidden: Tensor) -> Tensor:
    """Logits over the VQ codebook: the generation head, Linear -> GELU -> Linear."""
    return model.model.generation_head.vision_head(generation_features(model, hidden))
