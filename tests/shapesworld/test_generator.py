"""The ShapesWorld generator (earkit.engine.shapesworld.generator) at a tiny budget: the plumbing, in seconds.

The whole pipeline runs on a handful of steps: VQ training, generator training, saving, loading
with `load_janus` and sampling through earkit's own sampler. Quality (does it draw the requested
shape?) needs the full budget (minutes) and is tested on the shipped world
(tests/shapesworld/test_shapesworld.py).
"""

import json

import numpy as np
import pytest
import torch

from earkit.engine.shapesworld import render as world
from earkit.engine.model import encode_prompts, load_janus, unconditional
from earkit.engine.sampler import decode_images, sample_image_tokens
from earkit.engine.shapesworld.generator import (
    PatchCodes, VQConfig, build_generator, fit_patch_codes, prompt_batch, shapes_tokenizer, tiny_budget,
    tokenize_images, train_generator, train_vq,
)


@pytest.fixture(scope="module")
def tiny_trained():
    return train_vq(tiny_budget()[0], progress=False)


@pytest.fixture(scope="module")
def tiny_vq(tiny_trained):
    return tiny_trained[0]


@pytest.fixture(scope="module")
def rule():
    """The patch-code rule fitted on a few hundred renders, as a full build fits it."""
    images, _, _ = world.make_dataset(300, seed=11)
    return fit_patch_codes(images, VQConfig(), torch.Generator().manual_seed(0))


def render(**fields):
    scene = dict(shape="star", colour="red", size="medium", background="white", x=0.5, y=0.5, rotation=0.0)
    return np.asarray(world.render(world.Scene(**{**scene, **fields})))[None]


def test_flat_patches_get_their_colour_code(rule):
    for b, background in enumerate(world.BACKGROUNDS):
        for c, colour in enumerate(world.COLOURS):
            codes = rule.codes(render(shape="square", size="large", colour=colour, background=background))[0]
            assert codes[0] == b and codes[63] == b  # the corners are background
            grid = codes.view(8, 8)
            assert grid[3, 3] == grid[4, 4] == rule.colour_code(c)  # the square's inside
            edges = codes[(codes != b) & (codes != rule.colour_code(c))]
            assert len(edges) and all(rule.colour_code(c, 0) <= e < rule.colour_code(c + 1) for e in edges.tolist())


def test_codes_do_not_depend_on_the_other_colours(rule):
    # the same shape on another background, or in another colour: the same edge geometries
    red = rule.codes(render(colour="red", background="white"))[0]
    on_black = rule.codes(render(colour="red", background="black"))[0]
    blue = rule.codes(render(colour="blue", background="white"))[0]
    shape = red >= len(world.BACKGROUNDS)
    assert torch.equal(shape, on_black >= len(world.BACKGROUNDS))
    assert torch.equal(red[shape], on_black[shape])
    offset = rule.colour_code(list(world.COLOURS).index("blue")) - rule.colour_code(0)
    assert torch.equal(blue[shape], red[shape] + offset)


def test_a_shape_moved_by_whole_patches_gives_the_same_codes_moved(rule):
    here = rule.codes(render(size="small", x=0.375, y=0.375))[0].view(8, 8)
    there = rule.codes(render(size="small", x=0.625, y=0.5))[0].view(8, 8)
    assert torch.equal(here[:7, :6], there[1:, 2:])


def test_every_code_is_in_the_codebook_and_distinct(rule):
    images, _, _ = world.make_dataset(50, seed=3)
    codes = rule.codes(images)
    assert codes.shape == (50, 64) and int(codes.max()) < rule.size <= VQConfig().codebook_size
    vectors = rule.codebook(8, torch.Generator().manual_seed(0))
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(rule.size))
    similarity = vectors @ vectors.T - 2 * torch.eye(rule.size)
    assert float(similarity.max()) < 0.999  # no two codes share a vector: encode could not tell them apart


def test_patch_codes_save_and_load(rule, tmp_path):
    rule.save(tmp_path)
    again = PatchCodes.load(tmp_path)
    images, _, _ = world.make_dataset(5, seed=8)
    assert torch.equal(again.codes(images), rule.codes(images))


def test_too_small_a_codebook_is_refused():
    images, _, _ = world.make_dataset(4, seed=1)
    with pytest.raises(ValueError, match="codebook_size"):
        fit_patch_codes(images, VQConfig(codebook_size=12), torch.Generator())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = tmp_path_factory.mktemp("world") / "generator"
    vq_config, generator_config = tiny_budget()
    return build_generator(folder, vq_config, generator_config, progress=False)


def test_vq_round_trip_shapes_and_dtypes(tiny_vq):
    images, _, _ = world.make_dataset(3, seed=5)
    pixels = world.image_tensor(images)
    tokens = tokenize_images(tiny_vq, pixels)
    assert tokens.shape == (3, 64) and tokens.dtype == torch.long
    assert int(tokens.min()) >= 0 and int(tokens.max()) < tiny_vq.config.num_embeddings
    decoded = tiny_vq.decode(tokens)
    assert decoded.shape == pixels.shape and decoded.dtype == torch.float32
    assert torch.isfinite(decoded).all()


def test_vq_codebook_is_on_the_unit_sphere(tiny_vq):
    # encode (nearest by squared distance) and decode (l2-normalised lookup) agree only then
    norms = tiny_vq.quantize.embedding.weight.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_vq_training_is_deterministic(tiny_vq):
    again, _ = train_vq(tiny_budget()[0], progress=False)
    for (name, a), (_, b) in zip(tiny_vq.state_dict().items(), again.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_unconditional_rows_match_the_sampler():
    tokenizer = shapes_tokenizer()
    captions = ["a red circle", "a photo of a small blue star on a white background"]
    batch = prompt_batch(tokenizer, captions, torch.tensor([False, True]))
    plain = encode_prompts(tokenizer, captions)
    blank = unconditional(plain, tokenizer)
    assert torch.equal(batch.input_ids[0], plain.input_ids[0])
    assert torch.equal(batch.input_ids[1], blank.input_ids[1])
    assert torch.equal(batch.attention_mask, plain.attention_mask)


def test_generator_holds_the_trained_vq(tiny_trained):
    tiny_vq, tiny_rule = tiny_trained
    vq_config, generator_config = tiny_budget()
    model, tokenizer = train_generator(tiny_vq, tiny_rule, generator_config, progress=False, vq_config=vq_config)
    for name, tensor in tiny_vq.state_dict().items():
        assert torch.equal(model.model.vqmodel.state_dict()[name], tensor), name
    images, _, _ = world.make_dataset(2, seed=3)
    tokens = tokenize_images(tiny_vq, world.image_tensor(images))
    torch.testing.assert_close(model.decode_image_tokens(tokens), tiny_vq.decode(tokens).permute(0, 2, 3, 1))
    assert len(tokenizer) == model.config.text_config.vocab_size


def test_built_folder_loads_and_samples(built):
    record = json.loads((built / "world.json").read_text())
    assert record["seeds"] == {"vq": 0, "generator": 0}
    assert record["training_seconds"]["total"] > 0
    assert 0 <= record["vq_encoder_accuracy"] <= 1
    assert PatchCodes.load(built).size == len(world.BACKGROUNDS) + len(world.COLOURS) * 42
    model, tokenizer = load_janus(built, device="cpu")
    assert model.dtype == torch.float32
    # ShapesWorld's sampling is the folder's own, and its prompt words are written beside it; a
    # generator built alone (not in a world) names no default judge
    from earkit.engine.shapesworld import GUIDANCE_SCALE, TEMPERATURE

    assert (model.generation_config.guidance_scale, model.generation_config.temperature) == (GUIDANCE_SCALE,
                                                                                             TEMPERATURE)
    assert json.loads((built / "prompt_vocabulary.json").read_text()) == world.prompt_vocabulary()
    assert not (built / "earkit.json").exists()
    tokens = sample_image_tokens(model, tokenizer, ["a red circle", "a blue star"], seed=1, progress=False)
    assert tokens.shape == (2, 64)
    images = decode_images(model, tokens)
    assert [image.size for image in images] == [(64, 64)] * 2
    assert all(image.mode == "RGB" for image in images)
