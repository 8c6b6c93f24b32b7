"""Prompt attacks on an erasure: searches for prompts that make an erased Janus draw the concept again.

An erasure that a rephrased or optimised prompt undoes is not an erasure. Two of ECGVF's three
attacks search the model's own prompt space, and live here because the trainer uses one of them
(`earkit erase --robust`); the third, paraphrases from the pairs backends, is
ecgvf/pair_generation/paraphrase.py, and ecgvf/attacks.py runs all three and judges the images.

    found = soft_prompt_attack(erased, tokenizer, concept_prompts, base_tokens, n_tokens=4, steps=50)
    direction = concept_direction(base, tokenizer, concept_prompts, neutral_prompts)
    found = ring_a_bell_prompts(base, tokenizer, neutral_prompts, direction, strength=3.0)
    found.prompts   # text a user could type: the attacks end in real tokens

soft_prompt_attack (white-box, after UnlearnDiffAtk, with PEZ's projection): `n_tokens` free
token embeddings are put before each prompt's text, and optimised with Adam so that the attacked
model gives high likelihood to image tokens that the base model drew for that prompt (the image
the erasure took away). Each step the soft embeddings are projected to their nearest real tokens
(cosine) and the loss is taken at the projection (a straight-through gradient reaches the soft
ones), so the loss tracked is that of real tokens, and the best real tokens seen are kept.

ring_a_bell_prompts (black-box, after Ring-A-Bell): the "text embedding" of a prompt is the
model's last hidden state at <begin_of_image>, the state every image token is drawn after (Janus
has no text encoder of its own; the language model is it). The concept direction is the mean of
those states over prompts with the concept minus the same prompts without it; the target of a
neutral prompt is its state plus `strength` times the direction. A greedy coordinate search
(gradient-free, as Ring-A-Bell's genetic search) picks `n_tokens` tokens to append to the
neutral prompt, never the concept's own, whose state is closest (cosine) to the target. It is run
on the base model and the prompts are carried to the erased one, as Ring-A-Bell carries its
prompts from the original text encoder to any erased model.

Determinism: every row starts from tokens drawn by a generator seeded with derived_seed(seed,
row), the searches use no other randomness, and a row's tokens do not depend on the other rows
(each row's loss and Adam state are its own). A `seconds` budget can end a search before its
`steps`: the result says which ended it, and only a search that ran all its steps is reproducible.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .model import (BOI_TOKEN, embedded_image_hidden_states, image_logits, left_padded, positions, prompt_text,
                    special_token_ids)
from .sampler import derived_seed, eval_mode

WHERE = ("prefix", "suffix")


@dataclass
class FoundPrompts:
    """What an attack found: a prompt per input prompt, as text, and what it cost."""

    prompts: list[str]  # the attacked prompts, as a user would type them
    tokens: list[list[int]]  # the token ids the attack chose, per prompt
    losses: list[float]  # per prompt, the search's objective at those tokens (lower is stronger)
    steps: int  # search steps run
    seconds: float
    stopped: str  # "steps" (the budget ran out) or "seconds" (the time cap ended it first)
    retokenized: list[bool] = field(default_factory=list)  # the prompt's text encodes to the tokens searched

    def describe(self) -> dict:
        return {"steps": self.steps, "seconds": round(self.seconds, 3), "stopped": self.stopped,
                "mean_loss": sum(self.losses) / len(self.losses) if self.losses else None,
                "retokenized": sum(self.retokenized)}


def check_budget(n_tokens, steps, seconds) -> None:
    """ValueError naming the argument: a search needs at least one token and one step."""
    for name, value in (("n_tokens", n_tokens), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                                or not seconds > 0 or seconds == float("inf")):
        raise ValueError(f"seconds must be None or a finite number > 0, got {seconds!r}")


# ---------------------------------------------------------------- which tokens, and where


def forbidden_token_ids(tokenizer, words) -> set[int]:
    """Token ids that spell one of `words` (any case, with or without a leading space): the word's
    own token, or the pieces of three characters or more of a word split into several."""
    forbidden = set()
    for word in words or ():
        word = " ".join(str(word).split())
        if not word:
            continue
        for variant in {word, word.lower(), word.capitalize()}:
            for text in (variant, " " + variant):
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                if len(ids) == 1:
                    forbidden.update(ids)
                    continue
                for token in ids:
                    piece = tokenizer.decode([token]).strip().lower()
                    if len(piece) >= 3 and piece in word.lower():
                        forbidden.add(token)
    return forbidden


def attack_vocabulary(model, tokenizer, forbidden_words=()) -> Tensor:
    """The token ids an attack may choose (sorted LongTensor): the tokenizer's text tokens that the
    model embeds, not special or unknown, that decode to visible text, and none of forbidden_words'.
    Cached per tokenizer: `erase --robust` attacks every step, and decoding a 100,000-token
    vocabulary one token at a time is a CPU second it need not pay each time."""
    size = min(len(tokenizer), model.get_input_embeddings().num_embeddings)
    return _attack_vocabulary(tokenizer, size, tuple(str(word) for word in forbidden_words or ())).clone()


@functools.lru_cache(maxsize=8)
def _attack_vocabulary(tokenizer, size: int, forbidden_words: tuple) -> Tensor:
    excluded = set(tokenizer.all_special_ids) | set(special_token_ids(tokenizer).values())
    if tokenizer.unk_token_id is not None:
        excluded.add(tokenizer.unk_token_id)
    boi = tokenizer.convert_tokens_to_ids(getattr(tokenizer, "boi_token", None) or BOI_TOKEN)
    excluded.add(boi)
    excluded |= forbidden_token_ids(tokenizer, forbidden_words)
    texts = tokenizer.batch_decode([[index] for index in range(size)])
    allowed = [index for index, text in enumerate(texts)
               if index not in excluded and text.strip() and not (text.startswith("<") and text.endswith(">"))]
    if not allowed:
        raise ValueError("the tokenizer has no token an attack may use (every one is special or forbidden)")
    return torch.tensor(allowed, dtype=torch.long)


def initial_tokens(vocabulary: Tensor, n_tokens: int, seed: int, row: int) -> list[int]:
    generator = torch.Generator().manual_seed(derived_seed(seed, row))
    picks = torch.randint(len(vocabulary), (n_tokens,), generator=generator)
    return vocabulary[picks].tolist()


def insertion_ids(tokenizer, prompt: str, where: str) -> tuple[list[int], int]:
    """The prompt's ids in the Janus template (BOS first, as encode_prompts builds them) and the
    index at which attack tokens go: before the user's text (prefix) or right after it (suffix)."""
    if where not in WHERE:
        raise ValueError(f"where must be one of {WHERE}, got {where!r}")
    boi = getattr(tokenizer, "boi_token", None) or BOI_TOKEN
    prompt = prompt.strip()
    text = prompt_text(prompt, boi)
    start = text.index(prompt) if prompt else len(prompt_text("", boi).split("\n")[0])
    end = start + len(prompt)
    try:
        encoded = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):
        raise ValueError("the prompt attacks need a fast tokenizer (one that gives character offsets)") from None
    ids, offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])
    bos = special_token_ids(tokenizer)["bos"]
    if ids[0] != bos:
        ids, offsets = [bos] + ids, [(0, 0)] + offsets
    edge = start if where == "prefix" else end
    # the first token that starts at or after the edge (BOS and other zero-width tokens excepted)
    index = next((i for i, (first, last) in enumerate(offsets) if i > 0 and last > first and first >= edge), len(ids))
    return ids, index


def attacked_text(tokenizer, prompt: str, tokens: list[int], where: str) -> str:
    words = tokenizer.decode(tokens).strip()
    return f"{words} {prompt.strip()}" if where == "prefix" else f"{prompt.strip()} {words}"


@dataclass
class SlotBatch:
    """Left-padded prompt ids with room for the attack tokens, and where those slots are."""

    input_ids: Tensor  # (B, P)
    attention_mask: Tensor  # (B, P)
    slots: Tensor  # (B, n_tokens) column of each attack token


def slot_batch(insertions: list[tuple[list[int], int]], tokens: list[list[int]], pad: int, device) -> SlotBatch:
    """The prompts (each as insertion_ids gave it: its ids and where attack tokens go) with their
    attack tokens put in, left-padded (model.left_padded, as encode_prompts pads)."""
    rows = [ids[:index] + list(chosen) + ids[index:] for (ids, index), chosen in zip(insertions, tokens)]
    batch = left_padded(rows, pad)
    width = batch.input_ids.shape[1]
    columns = [[width - len(row) + index + k for k in range(len(chosen))]
               for row, (_, index), chosen in zip(rows, insertions, tokens)]
    return SlotBatch(batch.input_ids.to(device), batch.attention_mask.to(device), torch.tensor(columns, device=device))


def retokenizes(tokenizer, text: str, insertion: tuple[list[int], int], tokens: list[int]) -> bool:
    """Whether the attacked prompt's text encodes to the very ids the search scored."""
    from .model import encode_prompts

    ids, index = insertion
    return encode_prompts(tokenizer, [text]).input_ids[0].tolist() == ids[:index] + list(tokens) + ids[index:]


def nearest_tokens(soft: Tensor, vocabulary_unit: Tensor) -> Tensor:
    """Index into the vocabulary of each soft embedding's nearest token by cosine, (..., H) -> (...);
    vocabulary_unit: the vocabulary's embeddings, each of unit norm."""
    soft_unit = torch.nn.functional.normalize(soft.float(), dim=-1)
    return (soft_unit @ vocabulary_unit.T).argmax(dim=-1)


# ---------------------------------------------------------------- the white-box attack


def soft_prompt_attack(model, tokenizer, prompts: list[str], target_tokens: Tensor, *, n_tokens: int = 4,
                       steps: int = 50, seconds: float | None = None, lr: float | None = None, seed: int = 0,
                       forbidden_words=(), where: str = "prefix", batch_size: int | None = 16, rows=None,
                       progress: bool = False) -> FoundPrompts:
    """White-box: for each prompt, `n_tokens` real tokens (put `where` its text) under which the
    model gives the most likelihood to target_tokens[i] (its image tokens, (len(prompts), T):
    what the base model drew for the prompt). The model is not changed (no gradient reaches its
    weights). lr None: the vocabulary embeddings' RMS, so that a step is a token's scale at any
    model's size (on ShapesWorld it reached a lower loss than a tenth or a hundredth of it).
    rows: each prompt's row number, whose starting tokens are derived_seed(seed, row)'s (default
    0, 1, ...): the trainer numbers a step's rows across ranks, so a row starts alike on any rank."""
    from tqdm.auto import tqdm

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("prompts is empty")
    check_budget(n_tokens, steps, seconds)
    if target_tokens.ndim != 2 or target_tokens.shape[0] != len(prompts):
        raise ValueError(f"target_tokens must be (prompts, image tokens) = ({len(prompts)}, T), "
                         f"got {tuple(target_tokens.shape)}")
    rows = list(range(len(prompts))) if rows is None else [int(row) for row in rows]
    if len(rows) != len(prompts):
        raise ValueError(f"rows must number every prompt: {len(prompts)} prompts, {len(rows)} rows")
    if lr is not None and not (isinstance(lr, (int, float)) and lr > 0 and lr != float("inf")):
        raise ValueError(f"lr must be None or a finite number > 0, got {lr!r}")
    chunk = batch_size or len(prompts)
    vocabulary = attack_vocabulary(model, tokenizer, forbidden_words)
    embedding = model.get_input_embeddings()
    device = embedding.weight.device
    vocabulary_ids = vocabulary.to(device)
    vocabulary_embeddings = embedding.weight.detach()[vocabulary_ids]
    vocabulary_unit = torch.nn.functional.normalize(vocabulary_embeddings.float(), dim=-1)
    step_size = lr if lr is not None else vocabulary_embeddings.float().pow(2).mean().sqrt().item()

    pad = special_token_ids(tokenizer)["pad"]
    insertions = [insertion_ids(tokenizer, prompt, where) for prompt in prompts]
    started = time.perf_counter()
    found, losses, retokenized, steps_run, stopped = [], [], [], 0, "steps"
    total = -(-len(prompts) // chunk) * steps
    with eval_mode(model), tqdm(total=total, disable=not progress, desc="white-box attack", unit="step") as bar:
        for first in range(0, len(prompts), chunk):
            part = prompts[first:first + chunk]
            targets = target_tokens[first:first + chunk].to(device)
            start_ids = [initial_tokens(vocabulary, n_tokens, seed, rows[first + i]) for i in range(len(part))]
            batch = slot_batch(insertions[first:first + chunk], start_ids, pad, device)
            with torch.no_grad():
                base_embeds = embedding(batch.input_ids)
            soft = base_embeds.gather(1, batch.slots[..., None].expand(-1, -1, base_embeds.shape[-1]))
            soft = soft.detach().float().requires_grad_(True)
            optimizer = torch.optim.Adam([soft], lr=step_size)
            best_loss = torch.full((len(part),), float("inf"), device=device)
            best_ids = torch.tensor(start_ids, device=device)
            for step in range(steps):
                if seconds is not None and time.perf_counter() - started > seconds:
                    stopped = "seconds"
                    break
                nearest = nearest_tokens(soft.detach(), vocabulary_unit)
                projected = vocabulary_ids[nearest]
                hard = vocabulary_embeddings[nearest].float()
                straight = soft + (hard - soft).detach()  # the forward sees real tokens; the gradient reaches soft
                embeds = base_embeds.clone()
                embeds = embeds.scatter(1, batch.slots[..., None].expand_as(straight), straight.to(embeds.dtype))
                hidden = embedded_image_hidden_states(model, embeds, batch.attention_mask, targets)
                logits = image_logits(model, hidden).float()
                row_loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(1)
                with torch.no_grad():
                    better = row_loss.detach() < best_loss
                    best_loss = torch.where(better, row_loss.detach(), best_loss)
                    best_ids = torch.where(better[:, None], projected, best_ids)
                (gradient,) = torch.autograd.grad(row_loss.sum(), [soft])
                soft.grad = gradient
                optimizer.step()
                steps_run = max(steps_run, step + 1)
                bar.update(1)
            for i, prompt in enumerate(part):
                tokens = best_ids[i].tolist()
                text = attacked_text(tokenizer, prompt, tokens, where)
                found.append((text, tokens))
                losses.append(float(best_loss[i]))
                retokenized.append(retokenizes(tokenizer, text, insertions[first + i], tokens))
            if stopped == "seconds":
                break
    # prompts the time cap left unsearched keep their starting tokens, with no loss measured
    for index in range(len(found), len(prompts)):
        tokens = initial_tokens(vocabulary, n_tokens, seed, rows[index])
        found.append((attacked_text(tokenizer, prompts[index], tokens, where), tokens))
        losses.append(float("inf"))
        retokenized.append(False)
    return FoundPrompts([text for text, _ in found], [tokens for _, tokens in found], losses, steps_run,
                        time.perf_counter() - started, stopped, retokenized)


# ---------------------------------------------------------------- Ring-A-Bell


@torch.no_grad()
def prompt_states(model, tokenizer, prompts: list[str], *, batch_size: int = 64) -> Tensor:
    """(N, H) float32: the last hidden state at each prompt's <begin_of_image>, the state the first
    image token is drawn from (Janus' text embedding, in Ring-A-Bell's sense)."""
    from .model import encode_prompts

    states = []
    with eval_mode(model):
        for first in range(0, len(prompts), batch_size):
            batch = encode_prompts(tokenizer, prompts[first:first + batch_size], model.device)
            states.append(_last_states(model, batch.input_ids, batch.attention_mask))
    return torch.cat(states)


def _last_states(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    output = model.model.language_model(inputs_embeds=model.get_input_embeddings()(input_ids),
                                        attention_mask=attention_mask, position_ids=positions(attention_mask),
                                        use_cache=False)
    return output.last_hidden_state[:, -1].float()


def concept_direction(model, tokenizer, with_concept: list[str], without_concept: list[str]) -> Tensor:
    """(H,): mean prompt state of prompts with the concept minus that of prompts without it."""
    if not with_concept or not without_concept:
        raise ValueError("the concept direction needs prompts with the concept and prompts without it")
    return (prompt_states(model, tokenizer, list(with_concept)).mean(0)
            - prompt_states(model, tokenizer, list(without_concept)).mean(0))


def without_concept(prompt: str, concept: str, instead: str = "") -> str:
    """The prompt with every mention of the concept deleted (Ring-A-Bell's neutral prompt), or
    replaced by `instead`."""
    from earkit.ecgvf.pair_generation.parsing import concept_pattern

    return " ".join(concept_pattern(concept).sub(f" {instead} ", prompt).split())


@torch.no_grad()
def ring_a_bell_prompts(model, tokenizer, neutral_prompts: list[str], direction: Tensor, *, strength: float = 3.0,
                        n_tokens: int = 4, steps: int = 32, seconds: float | None = None, seed: int = 0,
                        forbidden_words=(), candidates: int = 256, batch_size: int = 256,
                        progress: bool = False) -> FoundPrompts:
    """Black-box: for each neutral prompt, `n_tokens` tokens appended to it (never one of
    forbidden_words') whose prompt state is closest (cosine) to the neutral prompt's state plus
    strength x direction. One step sets one token position of every prompt to its best of
    `candidates` tokens (every allowed token when there are fewer; else a seeded draw, the
    current token always among them); positions are taken in turn."""
    from tqdm.auto import tqdm

    prompts = [neutral_prompts] if isinstance(neutral_prompts, str) else list(neutral_prompts)
    if not prompts:
        raise ValueError("neutral_prompts is empty")
    check_budget(n_tokens, steps, seconds)
    if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
        raise ValueError(f"candidates must be an integer >= 1, got {candidates!r}")
    if not isinstance(strength, (int, float)) or strength != strength or abs(strength) == float("inf"):
        raise ValueError(f"strength must be a finite number, got {strength!r}")
    vocabulary = attack_vocabulary(model, tokenizer, forbidden_words)
    device = model.device
    targets = prompt_states(model, tokenizer, prompts) + strength * direction.to(device).float()
    targets = torch.nn.functional.normalize(targets, dim=-1)
    chosen = [initial_tokens(vocabulary, n_tokens, seed, row) for row in range(len(prompts))]
    # each prompt tokenised once: a step scores rows x candidates prompts that differ in one token
    pad = special_token_ids(tokenizer)["pad"]
    insertions = [insertion_ids(tokenizer, prompt, "suffix") for prompt in prompts]
    best = torch.full((len(prompts),), float("inf"))
    started, steps_run, stopped = time.perf_counter(), 0, "steps"
    with eval_mode(model), tqdm(total=steps, disable=not progress, desc="Ring-A-Bell search", unit="step") as bar:
        for step in range(steps):
            if seconds is not None and time.perf_counter() - started > seconds:
                stopped = "seconds"
                break
            position = step % n_tokens
            if len(vocabulary) <= candidates:
                pool = [vocabulary.tolist()] * len(prompts)
            else:
                pool = []
                for row in range(len(prompts)):
                    generator = torch.Generator().manual_seed(derived_seed(seed, row, step, 1))
                    picks = vocabulary[torch.randperm(len(vocabulary), generator=generator)[:candidates - 1]].tolist()
                    pool.append([chosen[row][position]] + [token for token in picks if token != chosen[row][position]])
            trials = [(row, token) for row in range(len(prompts)) for token in pool[row]]
            scores = []
            for first in range(0, len(trials), batch_size):
                part = trials[first:first + batch_size]
                tokens = [chosen[row][:position] + [token] + chosen[row][position + 1:] for row, token in part]
                batch = slot_batch([insertions[row] for row, _ in part], tokens, pad, device)
                states = torch.nn.functional.normalize(_last_states(model, batch.input_ids, batch.attention_mask), dim=-1)
                rows = torch.tensor([row for row, _ in part], device=device)
                scores.append(1 - (states * targets[rows]).sum(-1))
            scores = torch.cat(scores).cpu()
            offset = 0
            for row in range(len(prompts)):
                row_scores = scores[offset:offset + len(pool[row])]
                pick = int(row_scores.argmin())  # the current token is in the pool: never worse
                chosen[row][position] = pool[row][pick]
                best[row] = row_scores[pick]
                offset += len(pool[row])
            steps_run = step + 1
            bar.update(1)
    texts = [attacked_text(tokenizer, prompt, tokens, "suffix") for prompt, tokens in zip(prompts, chosen)]
    retokenized = [retokenizes(tokenizer, text, insertion, tokens)
                   for text, insertion, tokens in zip(texts, insertions, chosen)]
    return FoundPrompts(texts, chosen, [float(value) for value in best], steps_run, time.perf_counter() - started,
                        stopped, retokenized)
