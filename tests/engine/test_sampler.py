"""The CFG sampler (earkit.engine.sampler) on a tiny random Janus, fp32, CPU.

The key property: the logits the sampler draws from, one token at a time through a static KV
cache, equal the teacher-forced logits of one pass over the same tokens (what training uses),
for left-padded batches too. The released EAR code lacks it.
"""

import json
import warnings

import pytest
import torch

import earkit.engine.sampler as sampler
from earkit.engine.model import encode_prompts, image_hidden_states, image_logits, image_token_count, unconditional
from earkit.engine.sampler import decode_images, keep_top_k, keep_top_p, sample_image_tokens, write_samples
from earkit.engine.tiny import build_tiny_janus, sharpen, words_of

SHORT = "a red circle"
LONG = "a big blue square on the left of a green triangle under a yellow star"
PROMPTS = [SHORT, LONG]
TOL = dict(atol=1e-4, rtol=1e-4)


def tiny_janus():
    model, tokenizer = build_tiny_janus(words_of(PROMPTS + ["a photo"]))
    return sharpen(model), tokenizer


@pytest.fixture(scope="module")
def janus():
    return tiny_janus()


def sample(janus, prompts, **kwargs):
    model, tokenizer = janus
    kwargs.setdefault("progress", False)
    return sample_image_tokens(model, tokenizer, prompts, **kwargs)


def teacher_forced(janus, prompts, tokens, *, uncond=False):
    """Logits at every image position from one pass over prompt + tokens."""
    model, tokenizer = janus
    batch = encode_prompts(tokenizer, prompts)
    if uncond:
        batch = unconditional(batch, tokenizer)
    with torch.no_grad():
        return image_logits(model, image_hidden_states(model, batch, tokens))


# ---------------------------------------------------------------- equality with the teacher-forced pass


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])
def test_incremental_logits_equal_teacher_forced_with_left_padding(janus, guidance_scale):
    model, tokenizer = janus
    batch = encode_prompts(tokenizer, PROMPTS)
    assert (batch.attention_mask == 0).any(), "the prompts must differ in length, so one row is left-padded"
    tokens, logits = sample(janus, PROMPTS, guidance_scale=guidance_scale, seed=3, return_logits=True)
    assert tokens.shape == (2, image_token_count(model)) and tokens.dtype == torch.long
    assert logits.shape == (2, image_token_count(model), model.model.generation_head.vision_head.out_features)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, teacher_forced(janus, PROMPTS, tokens), **TOL)


def test_guided_tokens_maximise_the_cfg_of_teacher_forced_logits(janus):
    """Greedy at guidance 5: each token maximises uncond + 5 (cond - uncond), both teacher-forced."""
    tokens = sample(janus, PROMPTS, guidance_scale=5.0, temperature=0)
    cond = teacher_forced(janus, PROMPTS, tokens)
    uncond = teacher_forced(janus, PROMPTS, tokens, uncond=True)
    cfg = uncond + 5.0 * (cond - uncond)
    chosen = cfg.gather(-1, tokens[..., None]).squeeze(-1)
    assert (chosen >= cfg.max(dim=-1).values - 1e-4).all()
    # and guidance changes the image: the conditional argmax alone gives other tokens
    assert not torch.equal(tokens, sample(janus, PROMPTS, guidance_scale=1.0, temperature=0))


def test_guidance_one_is_conditional_only(janus):
    model, _ = janus
    rows_seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: rows_seen.append(kwargs["inputs_embeds"].shape[0]), with_kwargs=True)
    try:
        tokens, logits = sample(janus, PROMPTS, guidance_scale=1.0, temperature=0, return_logits=True)
        assert set(rows_seen) == {2}, "guidance 1 runs no unconditional rows"
        rows_seen.clear()
        sample(janus, PROMPTS, guidance_scale=5.0)
        assert set(rows_seen) == {4}, "guidance > 1 runs a conditional and an unconditional row per prompt"
    finally:
        hook.remove()
    assert torch.equal(tokens, logits.argmax(-1))
    torch.testing.assert_close(logits, teacher_forced(janus, PROMPTS, tokens), **TOL)


def test_padding_invariance(janus):
    """A prompt gives the same logits, hence the same greedy image, alone and beside a longer one."""
    alone_tokens, alone_logits = sample(janus, [SHORT], temperature=0, return_logits=True)
    batch_tokens, batch_logits = sample(janus, [LONG, SHORT], temperature=0, return_logits=True)
    assert torch.equal(alone_tokens[0], batch_tokens[1])
    torch.testing.assert_close(alone_logits[0], batch_logits[1], **TOL)


def test_chunks_equal_one_batch(janus):
    prompts = [SHORT, LONG, "a photo"]
    whole_tokens, whole_logits = sample(janus, prompts, temperature=0, return_logits=True)
    chunked_tokens, chunked_logits = sample(janus, prompts, temperature=0, return_logits=True, batch_size=2)
    assert torch.equal(whole_tokens, chunked_tokens)
    torch.testing.assert_close(whole_logits, chunked_logits, **TOL)
    assert sample(janus, prompts, batch_size=1).shape == (3, image_token_count(janus[0]))


def test_training_mode_and_checkpointing_still_use_the_cache():
    """transformers 5.17 drops the cache under gradient checkpointing in training mode; the sampler
    samples in eval mode and gives the model back in the mode it found it."""
    model, tokenizer = tiny_janus()
    expected = sample((model, tokenizer), PROMPTS, temperature=0, return_logits=True)
    # renamed activation_checkpointing_enable in 5.2x; 5.17 has only the old name
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.train()
    got = sample((model, tokenizer), PROMPTS, temperature=0, return_logits=True)
    assert model.training and model.model.language_model.training
    assert torch.equal(expected[0], got[0])
    torch.testing.assert_close(expected[1], got[1], **TOL)


# ---------------------------------------------------------------- randomness and the sampling rule


def test_seeds(janus):
    first = sample(janus, PROMPTS, seed=7)
    assert torch.equal(first, sample(janus, PROMPTS, seed=7))
    assert not torch.equal(first, sample(janus, PROMPTS, seed=8))


def test_an_image_depends_on_its_seed_not_on_its_batch(janus):
    """Each row draws from its own generator: a prompt sampled alone with seed s gives the tokens
    it gets beside other prompts, in any order and chunking, when its seed is s there."""
    alone = sample(janus, [SHORT], seeds=[11])[0]
    beside = sample(janus, [LONG, SHORT, "a photo"], seeds=[3, 11, 4])
    assert torch.equal(beside[1], alone)
    chunked = sample(janus, ["a photo", SHORT, LONG], seeds=[4, 11, 3], batch_size=2)
    assert torch.equal(chunked[1], alone) and torch.equal(chunked[2], beside[0])
    # seed=s without seeds gives prompt i the seed s + i
    assert torch.equal(sample(janus, [LONG, SHORT], seed=10)[1], alone)
    # the same prompt with two seeds: two images
    twice = sample(janus, [SHORT, SHORT], seeds=[11, 12])
    assert torch.equal(twice[0], alone) and not torch.equal(twice[0], twice[1])


def test_inverse_cdf_draws_by_probability():
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0]])
    picks = [int(sampler.inverse_cdf(probs, torch.tensor([u], dtype=torch.float64))) for u in
             (0.0, 0.2499, 0.25, 0.9999999, 1.0 - 2 ** -53)]
    assert picks == [1, 1, 3, 3, 3]  # zero-probability tokens never, the last one included
    uniforms = sampler.row_uniforms(list(range(4000)), 1, "cpu")[:, 0]
    counts = torch.bincount(sampler.inverse_cdf(probs.expand(4000, 5), uniforms), minlength=5)
    assert counts[[0, 2, 4]].sum() == 0 and abs(int(counts[3]) / 4000 - 0.75) < 0.03


@pytest.mark.parametrize("seeds, message", [
    ([1], "one seed per prompt"), ([1, 2.5], "integers"), ([1, True], "integers"), ([1, 2 ** 64], "integers"),
])
def test_bad_seeds_are_named(janus, seeds, message):
    with pytest.raises(ValueError, match=message):
        sample(janus, PROMPTS, seeds=seeds)


def test_derived_seeds_are_distinct_and_stable():
    seeds = {sampler.derived_seed(run, step, row) for run in range(3) for step in range(50) for row in range(8)}
    assert len(seeds) == 3 * 50 * 8 and all(0 <= seed < 2 ** 63 for seed in seeds)
    assert sampler.derived_seed(1, 2, 3) == sampler.derived_seed(1, 2, 3) != sampler.derived_seed(1, 3, 2)


def test_top_k_one_and_tiny_top_p_are_greedy(janus):
    greedy = sample(janus, PROMPTS, temperature=0)
    assert torch.equal(sample(janus, PROMPTS, top_k=1, seed=5), greedy)
    assert torch.equal(sample(janus, PROMPTS, top_p=1e-6, seed=5), greedy)


def test_filters_on_known_logits():
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3]]))
    assert torch.isfinite(keep_top_k(logits, 2)).tolist() == [[False, True, False, True]]
    assert torch.equal(keep_top_k(logits, 4), logits)
    # nucleus: smallest set of most likely tokens reaching p
    assert torch.isfinite(keep_top_p(logits, 0.4)).tolist() == [[False, True, False, False]]
    assert torch.isfinite(keep_top_p(logits, 0.5)).tolist() == [[False, True, False, True]]
    assert torch.isfinite(keep_top_p(logits, 0.75)).tolist() == [[False, True, True, True]]
    assert torch.equal(keep_top_p(logits, 1.0), logits)


def test_filtered_sampling_stays_in_the_kept_set(janus):
    """top_k = 3 draws only among the 3 largest CFG logits at every step."""
    tokens = sample(janus, PROMPTS, top_k=3, seed=2)
    cond = teacher_forced(janus, PROMPTS, tokens)
    uncond = teacher_forced(janus, PROMPTS, tokens, uncond=True)
    top3 = torch.topk(uncond + 5.0 * (cond - uncond), 3, dim=-1).indices
    assert (top3 == tokens[..., None]).any(-1).all()


@pytest.mark.parametrize("kwargs, name", [
    (dict(guidance_scale=0.5), "guidance_scale"),
    (dict(guidance_scale=float("nan")), "guidance_scale"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(batch_size=0), "batch_size"),
    (dict(cuda_graph="yes"), "cuda_graph"),
])
def test_bad_arguments(janus, kwargs, name):
    with pytest.raises(ValueError, match=name):
        sample(janus, PROMPTS, **kwargs)


def test_guidance_one_and_temperature_zero_are_valid(janus):
    assert sample(janus, PROMPTS, guidance_scale=1, temperature=0).shape[0] == 2


# ---------------------------------------------------------------- the CUDA-graph path, with a stand-in graph


def stand_in_capture(rows, codebook, captures):
    """Like capture_cuda_graph: records without running, and replay() refills one output buffer
    (so a sampler that kept a reference to it instead of a copy would see only the last step)."""

    def capture(function):
        captures.append(function)
        output = torch.full((rows, codebook), float("nan"))
        return (lambda: output.copy_(function())), output

    return capture


def test_graph_path_replays_the_same_step(janus, monkeypatch):
    model, _ = janus
    expected = sample(janus, PROMPTS, seed=4, return_logits=True, cuda_graph=False)
    captures = []
    monkeypatch.setattr(sampler, "cuda_graph_blocker", lambda model: None)
    monkeypatch.setattr(sampler, "capture_cuda_graph",
                        stand_in_capture(4, model.model.generation_head.vision_head.out_features, captures))
    got = sample(janus, PROMPTS, seed=4, return_logits=True, cuda_graph=True)
    assert len(captures) == 1
    assert torch.equal(expected[0], got[0])
    torch.testing.assert_close(expected[1], got[1], **TOL)


def test_graph_capture_failure_falls_back_with_one_warning(janus, monkeypatch):
    def failing_capture(function):
        raise RuntimeError("operation not permitted when stream is capturing")

    expected = sample(janus, PROMPTS, seed=4, cuda_graph=False, batch_size=1)
    monkeypatch.setattr(sampler, "_warned", set())
    monkeypatch.setattr(sampler, "cuda_graph_blocker", lambda model: None)
    monkeypatch.setattr(sampler, "capture_cuda_graph", failing_capture)
    with pytest.warns(RuntimeWarning, match="capture failed"):
        got = sample(janus, PROMPTS, seed=4, cuda_graph="auto", batch_size=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sample(janus, PROMPTS, seed=4, cuda_graph="auto")  # warned once already: silent now
    assert torch.equal(expected, got)


def test_cuda_graph_true_on_cpu_warns_and_runs_eagerly(janus, monkeypatch):
    monkeypatch.setattr(sampler, "_warned", set())
    with pytest.warns(RuntimeWarning, match="not CUDA"):
        tokens = sample(janus, PROMPTS, seed=4, cuda_graph=True)
    assert torch.equal(tokens, sample(janus, PROMPTS, seed=4, cuda_graph=False))


# ---------------------------------------------------------------- images and files


def test_decode_images(janus):
    model, _ = janus
    tokens = sample(janus, PROMPTS + ["a photo"])
    images = decode_images(model, tokens, batch_size=2)
    size = model.config.vision_config.image_size
    assert len(images) == 3
    assert all(image.size == (size, size) and image.mode == "RGB" for image in images)


def test_write_samples(janus, tmp_path):
    model, tokenizer = janus
    out = tmp_path / "samples"
    written = write_samples(model, tokenizer, PROMPTS, out, images_per_prompt=2, seed=9, progress=False)
    names = sorted(path.name for path in out.iterdir() if path.name != ".earkit-files.json")
    assert names == ["000_00.png", "000_01.png", "001_00.png", "001_01.png", "grid.png", "images.json",
                     "prompts.json"]
    manifest = json.loads((out / ".earkit-files.json").read_text())
    assert manifest["kind"] == "samples" and manifest["files"] == names
    assert sorted(path.name for path in written) == sorted(set(names) - {"images.json"})
    assert all(path.parent == out for path in written)
    from PIL import Image

    size = model.config.vision_config.image_size
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (2 * size, 2 * size)
    record = json.loads((out / "prompts.json").read_text())
    assert record["prompts"] == PROMPTS and record["seed"] == 9
    assert record["settings"]["guidance_scale"] == 5.0 and record["settings"]["images_per_prompt"] == 2
    assert [(image["file"], image["seed"]) for image in record["images"]][:2] == [("000_00.png", 9), ("000_01.png", 10)]
    assert list(tmp_path.iterdir()) == [out], "no temporary folders left beside the output"

    # image i of a prompt is the image its seed (9 + i) gives that prompt alone (the decoder, run
    # on a batch of four or of one, may round a pixel apart)
    alone = decode_images(model, sample(janus, [LONG], seeds=[10]))[0]
    with Image.open(out / "001_01.png") as image:
        difference = (torch.tensor(list(image.tobytes())) - torch.tensor(list(alone.tobytes()))).abs()
    assert difference.max() <= 1 and (difference == 0).float().mean() > 0.99

    # the same run again: everything is there, nothing is drawn, nothing changes
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    write_samples(model, tokenizer, PROMPTS, out, images_per_prompt=2, seed=9, progress=False)
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before
    # other settings are refused by name, without --force
    with pytest.raises(ValueError, match="seed 9.*seed 0.*--force"):
        write_samples(model, tokenizer, PROMPTS, out, images_per_prompt=2, progress=False)
    with pytest.raises(ValueError, match="temperature"):
        write_samples(model, tokenizer, PROMPTS, out, images_per_prompt=2, seed=9, temperature=0.5, progress=False)
    write_samples(model, tokenizer, [SHORT], out, force=True, progress=False)
    assert sorted(path.name for path in out.iterdir()) == [".earkit-files.json", "000_00.png", "grid.png",
                                                           "images.json", "prompts.json"]
    assert list(tmp_path.iterdir()) == [out]

    empty = tmp_path / "empty"
    empty.mkdir()
    write_samples(model, tokenizer, [SHORT], empty, progress=False)  # an empty folder is fine
    assert (empty / "000_00.png").is_file()


def test_a_killed_sample_run_continues_where_it_stopped(janus, tmp_path, monkeypatch):
    """Images are written as they are drawn: a run that dies after its first batch leaves them (and
    its images.json); the rerun draws only the rest and ends with the files of an unbroken run."""
    model, tokenizer = janus
    prompts = [SHORT, LONG, "a photo", SHORT + " a photo"]
    whole = tmp_path / "whole"
    write_samples(model, tokenizer, prompts, whole, images_per_prompt=2, batch_size=3, progress=False)

    out = tmp_path / "out"
    calls = []
    real_decode = sampler.decode_images

    def decode_then_die(model, tokens, **kwargs):
        calls.append(tokens.shape[0])
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real_decode(model, tokens, **kwargs)

    monkeypatch.setattr(sampler, "decode_images", decode_then_die)
    with pytest.raises(RuntimeError, match="killed"):
        write_samples(model, tokenizer, prompts, out, images_per_prompt=2, batch_size=3, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["000_00.png", "000_01.png", "001_00.png", "images.json"]
    with pytest.raises(ValueError, match="images_per_prompt 2.*images_per_prompt 1"):
        write_samples(model, tokenizer, prompts, out, batch_size=3, progress=False)  # not the same run

    calls.clear()
    monkeypatch.setattr(sampler, "decode_images", lambda model, tokens, **kwargs: (
        calls.append(tokens.shape[0]), real_decode(model, tokens, **kwargs))[1])
    write_samples(model, tokenizer, prompts, out, images_per_prompt=2, batch_size=3, progress=False)
    assert calls == [3, 2], "only the two batches not yet drawn"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in whole.iterdir()}


def test_write_samples_force_leaves_no_foreign_file_behind(janus, tmp_path):
    model, tokenizer = janus
    out = tmp_path / "out"
    write_samples(model, tokenizer, PROMPTS, out, progress=False)
    (out / "notes.md").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.md"):
        write_samples(model, tokenizer, PROMPTS, out, seed=3, force=True, progress=False)
    assert (out / "notes.md").read_text() == "mine"


# ---------------------------------------------------------------- sampling defaults: the model's own


@pytest.fixture
def own_sampling(janus):
    """The tiny Janus with guidance 1 and temperature 0 in its generation_config, as a model
    folder's generation_config.json would set them; restored afterwards."""
    import copy

    model, tokenizer = janus
    saved = copy.deepcopy(model.generation_config)
    model.generation_config.do_sample, model.generation_config.guidance_scale = True, 1.0
    model.generation_config.temperature = 0.0
    yield model, tokenizer
    model.generation_config = saved


def test_the_sampler_takes_guidance_and_temperature_from_the_generation_config(own_sampling, tmp_path):
    model, tokenizer = own_sampling
    own = sample((model, tokenizer), PROMPTS, seed=4)
    torch.testing.assert_close(own, sample((model, tokenizer), PROMPTS, guidance_scale=1.0, temperature=0.0, seed=9))
    # explicit arguments win over the model's: the same draw as on a model without its own settings
    given = sample((model, tokenizer), PROMPTS, guidance_scale=5.0, temperature=1.0, seed=4)
    model.generation_config.guidance_scale = model.generation_config.temperature = None
    torch.testing.assert_close(given, sample((model, tokenizer), PROMPTS, seed=4))
    model.generation_config.guidance_scale, model.generation_config.temperature = 1.0, 0.0
    write_samples(model, tokenizer, [SHORT], tmp_path / "own", progress=False)
    write_samples(model, tokenizer, [SHORT], tmp_path / "given", temperature=0.7, progress=False)
    settings = {name: json.loads((tmp_path / name / "prompts.json").read_text())["settings"] for name in ("own", "given")}
    assert (settings["own"]["guidance_scale"], settings["own"]["temperature"]) == (1.0, 0.0)
    assert (settings["given"]["guidance_scale"], settings["given"]["temperature"]) == (1.0, 0.7)


def test_sampling_defaults_are_janus_pros_where_the_model_sets_none(tmp_path):
    from transformers import GenerationConfig

    from earkit.engine.tiny import save_tiny_janus

    assert sampler.sampling_defaults(None) == sampler.sampling_defaults(GenerationConfig()) == (5.0, 1.0)
    assert sampler.sampling_defaults(GenerationConfig(do_sample=True, temperature=0.3)) == (5.0, 0.3)
    model, tokenizer = save_tiny_janus(tmp_path / "plain", ["red", "circle"])
    assert sampler.source_sampling_defaults(tmp_path / "plain") == (5.0, 1.0)
    model.generation_config.do_sample, model.generation_config.guidance_scale = True, 2.5
    model.generation_config.temperature = 0.25
    model.save_pretrained(tmp_path / "own")
    assert sampler.source_sampling_defaults(tmp_path / "own") == (2.5, 0.25)
    assert sampler.source_sampling_defaults(tmp_path / "missing") == (5.0, 1.0)


def test_a_generation_config_value_that_is_not_a_number_is_named():
    from types import SimpleNamespace

    with pytest.raises(ValueError, match=r"generation_config.json: guidance_scale must be a number, got 'abc'"):
        sampler.sampling_defaults(SimpleNamespace(guidance_scale="abc", temperature=None))
    with pytest.raises(ValueError, match=r"generation_config.json: temperature must be a number, got \[1\]"):
        sampler.sampling_defaults(SimpleNamespace(guidance_scale=None, temperature=[1]))


def test_the_grid_shows_the_first_prompts_only(janus, tmp_path, monkeypatch):
    """A samples folder of thousands of prompts gets a grid of its first GRID_PROMPTS, and its
    images are read back from the folder, not all held in memory."""
    from PIL import Image

    model, tokenizer = janus
    monkeypatch.setattr(sampler, "GRID_PROMPTS", 2)
    write_samples(model, tokenizer, [SHORT, LONG, "a photo"], tmp_path / "out", images_per_prompt=2, progress=False)
    size = model.config.vision_config.image_size
    with Image.open(tmp_path / "out" / "grid.png") as grid:
        assert grid.size == (2 * size, 2 * size)
    assert (tmp_path / "out" / "002_01.png").is_file()


# ---------------------------------------------------------------- the CFG pad id


def test_cfg_rows_use_the_pad_the_generation_config_names(janus):
    from earkit.engine.model import cfg_pad_id

    model, tokenizer = janus
    tokenizer_pad = tokenizer.pad_token_id
    word = tokenizer.convert_tokens_to_ids("photo")
    saved = model.generation_config.pad_token_id
    try:
        model.generation_config.pad_token_id = None
        assert cfg_pad_id(model, tokenizer) == tokenizer_pad
        plain = sample(janus, PROMPTS, guidance_scale=3.0, temperature=0)
        for unusable in (10 ** 9, -1, True):
            model.generation_config.pad_token_id = unusable
            assert cfg_pad_id(model, tokenizer) == tokenizer_pad
        model.generation_config.pad_token_id = [word]
        assert cfg_pad_id(model, tokenizer) == word
        model.generation_config.pad_token_id = word
        assert cfg_pad_id(model, tokenizer) == word
        tokens = sample(janus, PROMPTS, guidance_scale=3.0, temperature=0)
    finally:
        model.generation_config.pad_token_id = saved
    assert not torch.equal(tokens, plain)  # the unconditional rows' pad changes the images
    # greedy CFG over teacher-forced passes whose unconditional rows are padded with `word`
    batch = encode_prompts(tokenizer, PROMPTS)
    with torch.no_grad():
        cond = image_logits(model, image_hidden_states(model, batch, tokens)).double()
        blank = unconditional(batch, tokenizer, word)
        assert (blank.input_ids == word).any() and not (blank.input_ids == tokenizer_pad).all()
        uncond = image_logits(model, image_hidden_states(model, blank, tokens)).double()
    guided_logits = uncond + 3.0 * (cond - uncond)
    chosen = guided_logits.gather(-1, tokens[..., None]).squeeze(-1)
    assert (chosen >= guided_logits.max(-1).values - 1e-3).all()
