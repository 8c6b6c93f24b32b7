"""The prompt attacks (earkit.engine.attacks) on a tiny random Janus, fp32, CPU.

What an attack reports is checked against an independent computation: the white-box loss of the
tokens it chose is the teacher-forced cross-entropy of its prompt TEXT, re-encoded (float64);
Ring-A-Bell's is 1 - cosine between that text's prompt state and the target, computed apart.
"""

import pytest
import torch

from earkit.engine import attacks
from earkit.engine.model import encode_prompts, image_hidden_states, image_logits
from earkit.engine.sampler import sample_image_tokens
from earkit.engine.tiny import build_tiny_janus, sharpen, words_of

PROMPTS = ["a red circle", "a photo of a blue circle on the left", "a green square"]
WORDS = words_of(PROMPTS + ["a yellow star with a big cross", "purple triangle"])


@pytest.fixture(scope="module")
def janus():
    model, tokenizer = build_tiny_janus(WORDS)
    return sharpen(model).eval(), tokenizer


@pytest.fixture(scope="module")
def targets(janus):
    model, tokenizer = janus
    return sample_image_tokens(model, tokenizer, PROMPTS, guidance_scale=1.0, temperature=1.0, seed=3, progress=False)


def text_loss(model, tokenizer, texts, tokens) -> torch.Tensor:
    """Mean cross-entropy per prompt of its image tokens, from the prompt text, in float64."""
    with torch.no_grad():
        hidden = image_hidden_states(model, encode_prompts(tokenizer, texts), tokens)
        logits = image_logits(model, hidden).double()
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), tokens, reduction="none").mean(1)


def test_white_box_reports_the_loss_of_its_real_prompt_and_lowers_it(janus, targets):
    model, tokenizer = janus
    found = attacks.soft_prompt_attack(model, tokenizer, PROMPTS, targets, n_tokens=3, steps=12, seed=0)
    assert found.steps == 12 and found.stopped == "steps" and len(found.prompts) == len(PROMPTS)
    assert all(found.retokenized)  # the text encodes to the very tokens searched
    allowed = set(attacks.attack_vocabulary(model, tokenizer).tolist())
    assert all(len(tokens) == 3 and set(tokens) <= allowed for tokens in found.tokens)
    for prompt, text in zip(PROMPTS, found.prompts):
        assert text.endswith(prompt) and text != prompt  # prefix tokens, then the prompt itself
    reference = text_loss(model, tokenizer, found.prompts, targets)
    torch.testing.assert_close(torch.tensor(found.losses, dtype=torch.float64), reference, atol=1e-4, rtol=1e-4)
    # no worse than where it started (the start is the first loss it saw), and better than no attack for some prompt
    start = [attacks.attacked_text(tokenizer, p, attacks.initial_tokens(
        attacks.attack_vocabulary(model, tokenizer), 3, 0, row), "prefix") for row, p in enumerate(PROMPTS)]
    assert (reference <= text_loss(model, tokenizer, start, targets) + 1e-6).all()


def test_white_box_is_deterministic_and_a_row_does_not_depend_on_its_batch(janus, targets):
    model, tokenizer = janus
    options = dict(n_tokens=2, steps=6, seed=5)
    first = attacks.soft_prompt_attack(model, tokenizer, PROMPTS, targets, **options)
    again = attacks.soft_prompt_attack(model, tokenizer, PROMPTS, targets, **options)
    alone = attacks.soft_prompt_attack(model, tokenizer, PROMPTS[1:2], targets[1:2], rows=[1], **options)
    assert first.prompts == again.prompts and first.losses == again.losses
    assert alone.tokens[0] == first.tokens[1]
    other_seed = attacks.soft_prompt_attack(model, tokenizer, PROMPTS, targets, n_tokens=2, steps=6, seed=6)
    assert other_seed.tokens != first.tokens


def test_white_box_leaves_the_model_alone(janus, targets):
    model, tokenizer = janus
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    attacks.soft_prompt_attack(model, tokenizer, PROMPTS[:1], targets[:1], n_tokens=2, steps=3)
    for name, parameter in model.named_parameters():
        assert parameter.grad is None
        assert torch.equal(parameter, before[name]), name


def test_forbidden_words_are_never_chosen(janus, targets):
    model, tokenizer = janus
    vocabulary = attacks.attack_vocabulary(model, tokenizer, ["circle", "Square"])
    words = set(tokenizer.batch_decode([[index] for index in vocabulary.tolist()]))
    assert not words & {"circle", "square"} and {"red", "star"} <= words
    assert not any(w.startswith("<") for w in words)  # no special token
    found = attacks.soft_prompt_attack(model, tokenizer, PROMPTS, targets, n_tokens=3, steps=4,
                                       forbidden_words=["circle"])
    assert all("circle" not in tokenizer.decode(tokens).split() for tokens in found.tokens)


def test_a_time_cap_ends_the_search_and_says_so(janus, targets):
    model, tokenizer = janus
    found = attacks.soft_prompt_attack(model, tokenizer, PROMPTS, targets, n_tokens=2, steps=1000, seconds=1e-9)
    assert found.stopped == "seconds" and found.steps < 1000 and len(found.prompts) == len(PROMPTS)


@pytest.mark.parametrize("options, named", [
    (dict(n_tokens=0), "n_tokens"), (dict(steps=0), "steps"), (dict(seconds=0), "seconds"),
    (dict(seconds=float("nan")), "seconds"), (dict(steps=True), "steps"), (dict(lr=-1.0), "lr"),
])
def test_a_zero_or_bad_budget_is_refused_by_name(janus, targets, options, named):
    model, tokenizer = janus
    with pytest.raises(ValueError, match=named):
        attacks.soft_prompt_attack(model, tokenizer, PROMPTS, targets, **options)


def test_targets_must_match_the_prompts(janus, targets):
    model, tokenizer = janus
    with pytest.raises(ValueError, match="target_tokens"):
        attacks.soft_prompt_attack(model, tokenizer, PROMPTS, targets[:2])


def test_suffix_tokens_go_after_the_prompt_text(janus):
    model, tokenizer = janus
    ids, prefix_at = attacks.insertion_ids(tokenizer, "a red circle", "prefix")
    _, suffix_at = attacks.insertion_ids(tokenizer, "a red circle", "suffix")
    assert tokenizer.decode(ids[prefix_at:suffix_at]).split() == ["a", "red", "circle"]
    assert attacks.attacked_text(tokenizer, "a red circle", [ids[prefix_at + 1]], "suffix") == "a red circle red"


def test_ring_a_bell_reports_its_distance_and_avoids_the_concept(janus):
    model, tokenizer = janus
    with_concept = ["a red circle", "a blue circle", "a photo of a green circle"]
    neutral = [attacks.without_concept(p, "circle") for p in with_concept]
    assert neutral == ["a red", "a blue", "a photo of a green"]
    direction = attacks.concept_direction(model, tokenizer, with_concept, neutral)
    by_hand = attacks.prompt_states(model, tokenizer, with_concept).mean(0) - attacks.prompt_states(
        model, tokenizer, neutral).mean(0)
    torch.testing.assert_close(direction, by_hand)
    found = attacks.ring_a_bell_prompts(model, tokenizer, neutral, direction, strength=2.0, n_tokens=2, steps=4,
                                        seed=1, forbidden_words=["circle"])
    again = attacks.ring_a_bell_prompts(model, tokenizer, neutral, direction, strength=2.0, n_tokens=2, steps=4,
                                        seed=1, forbidden_words=["circle"])
    assert found.prompts == again.prompts and found.steps == 4 and all(found.retokenized)
    assert all("circle" not in text.split() for text in found.prompts)
    target = torch.nn.functional.normalize(attacks.prompt_states(model, tokenizer, neutral).double()
                                           + 2.0 * direction.double(), dim=-1)
    state = torch.nn.functional.normalize(attacks.prompt_states(model, tokenizer, found.prompts).double(), dim=-1)
    torch.testing.assert_close(torch.tensor(found.losses, dtype=torch.float64), 1 - (state * target).sum(-1),
                               atol=1e-5, rtol=1e-4)
    # every step keeps the best: no worse than the starting tokens
    start = [attacks.attacked_text(tokenizer, n, attacks.initial_tokens(
        attacks.attack_vocabulary(model, tokenizer, ["circle"]), 2, 1, row), "suffix") for row, n in enumerate(neutral)]
    start_state = torch.nn.functional.normalize(attacks.prompt_states(model, tokenizer, start).double(), dim=-1)
    assert (torch.tensor(found.losses, dtype=torch.float64) <= 1 - (start_state * target).sum(-1) + 1e-6).all()


def test_ring_a_bell_refuses_a_bad_budget(janus):
    model, tokenizer = janus
    direction = torch.zeros(model.config.get_text_config().hidden_size)
    for options, named in ((dict(steps=0), "steps"), (dict(candidates=0), "candidates"),
                           (dict(strength=float("inf")), "strength")):
        with pytest.raises(ValueError, match=named):
            attacks.ring_a_bell_prompts(model, tokenizer, ["a red"], direction, **options)
