"""The ShapesWorld generator (earkit.engine.world_model) at a tiny budget: the plumbing, in seconds.

The whole pipeline runs on a handful of steps: VQ training, generator training, saving, loading
with `load_janus` and sampling through earkit's own sampler. Quality (does it draw the requested
shape?) needs the full budget (minutes) and is tested on the shipped world
(tests/test_shapesworld.py).
"""

import json

import pytest
import torch

from earkit.engine import world
from earkit.engine.model import encode_prompts, load_janus, unconditional
from earkit.engine.sampler import decode_images, sample_image_tokens
from earkit.engine.world_model import (
    build_generator, prompt_batch, shapes_tokenizer, tiny_budget, tokenize_images, train_generator, train_vq,
)


@pytest.fixture(scope="module")
def tiny_vq():
    return train_vq(tiny_budget()[0], progress=False)


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
    again = train_vq(tiny_budget()[0], progress=False)
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


def test_generator_holds_the_trained_vq(tiny_vq):
    vq_config, generator_config = tiny_budget()
    model, tokenizer = train_generator(tiny_vq, generator_config, progress=False, vq_config=vq_config)
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
    model, tokenizer = load_janus(built, device="cpu")
    assert model.dtype == torch.float32
    tokens = sample_image_tokens(model, tokenizer, ["a red circle", "a blue star"], seed=1, progress=False)
    assert tokens.shape == (2, 64)
    images = decode_images(model, tokens)
    assert [image.size for image in images] == [(64, 64)] * 2
    assert all(image.mode == "RGB" for image in images)
