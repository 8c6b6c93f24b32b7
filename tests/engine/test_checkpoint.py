"""Checkpoints: bitwise round trips, exact resume with torch and bitsandbytes optimizers, atomic
replacement that survives a crash or a kill (the folder mechanics themselves: tests/test_io.py),
and export to a full model folder."""

import json
import random

import pytest
import torch
from torch import nn

from earkit import __version__
from earkit import io as earkit_io
from earkit.engine import checkpoint
from earkit.engine.checkpoint import apply_trainable, export_checkpoint, export_model, load_checkpoint, save_checkpoint, trainable_tensors


def siblings(folder):
    """Everything beside a checkpoint folder in its parent, by name."""
    return sorted(path.name for path in folder.parent.iterdir())


def small_checkpoint(folder, value: float, **keywords):
    return save_checkpoint(folder, tensors={"layer.weight": torch.full((4, 3), value)},
                           optimizer_state={"state": {}, "param_groups": []}, state={"step": int(value)},
                           config={"value": value}, **keywords)


def loaded_value(folder) -> float:
    loaded = load_checkpoint(folder)
    assert loaded.state["step"] == int(loaded.config["value"])  # files from one save, not a mix
    return float(loaded.tensors["layer.weight"][0, 0])


# ---------------------------------------------------------------- round trips


def test_round_trip_is_bitwise(tmp_path):
    torch.manual_seed(0)
    tensors = {
        "model.language_model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8),
        "model.language_model.layers.0.self_attn.k_proj.weight": torch.randn(8, 4).to(torch.bfloat16),
        "half": torch.randn(5).half(),
        "transposed": torch.randn(3, 6).t(),  # not contiguous
        "view_of_a_bigger_buffer": torch.randn(10)[2:6],  # shares storage: safetensors needs its own
        "counts": torch.arange(6, dtype=torch.int64),
    }
    generator = torch.Generator().manual_seed(5)
    state = {"step": 12, "epoch": 1, "position": [3, 4],
             "rng": {"torch": torch.get_rng_state(), "generator": generator.get_state(), "python": random.getstate(),
                     "cuda": [torch.zeros(16, dtype=torch.uint8)]},
             "history": {"losses": [0.5, float("nan")], "seconds": 1.25}}
    expected_torch_draw = torch.rand(4)
    expected_generator_draw = torch.rand(4, generator=generator)
    expected_python_draw = random.random()

    folder = save_checkpoint(tmp_path / "run" / "checkpoint", tensors=tensors,
                             optimizer_state={"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": []},
                             state=state, config={"erase": {"lr": 1e-4, "window": 48}, "dtype": torch.bfloat16},
                             base_model="deepseek-community/Janus-Pro-1B")
    assert folder == (tmp_path / "run" / "checkpoint").absolute()
    assert sorted(p.name for p in folder.iterdir()) == sorted([*checkpoint.CHECKPOINT_FILES, earkit_io.MANIFEST_FILE])
    assert siblings(folder) == ["checkpoint"]

    loaded = load_checkpoint(folder)
    assert loaded.tensors.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded.tensors[name].dtype == tensor.dtype
        assert loaded.tensors[name].is_contiguous()
        assert torch.equal(loaded.tensors[name], tensor), name
    assert torch.equal(loaded.optimizer_state["state"][0]["exp_avg"], torch.ones(3))
    assert loaded.config == {"erase": {"lr": 1e-4, "window": 48}, "dtype": "bfloat16"}
    assert loaded.base_model == "deepseek-community/Janus-Pro-1B"
    assert loaded.earkit_version == __version__
    record = json.loads((folder / "config.json").read_text())
    assert record["earkit_version"] == __version__ and record["base_model"] == "deepseek-community/Janus-Pro-1B"

    assert loaded.state["step"] == 12 and loaded.state["position"] == [3, 4]
    assert loaded.state["history"]["losses"][0] == 0.5
    torch.set_rng_state(loaded.state["rng"]["torch"])
    restored = torch.Generator()
    restored.set_state(loaded.state["rng"]["generator"])
    random.setstate(loaded.state["rng"]["python"])
    assert torch.equal(torch.rand(4), expected_torch_draw)
    assert torch.equal(torch.rand(4, generator=restored), expected_generator_draw)
    assert random.random() == expected_python_draw


def test_local_base_model_is_recorded_as_absolute_path(tmp_path, monkeypatch):
    (tmp_path / "base").mkdir()
    monkeypatch.chdir(tmp_path)
    folder = save_checkpoint("checkpoint", tensors={"w": torch.ones(1)}, optimizer_state={}, state={},
                             config={"base_model": "base"})
    assert load_checkpoint(folder).base_model == str(tmp_path / "base")


def make_adamw(parameters):
    return torch.optim.AdamW(parameters, lr=1e-2, weight_decay=0.01)


def make_bnb(name):
    def make(parameters):
        import bitsandbytes as bnb  # a dependency of earkit on x86_64 and aarch64
        return getattr(bnb.optim, name)(parameters, lr=1e-2, weight_decay=0.01)
    return make


def train(model, optimizer, generator, steps):
    for _ in range(steps):
        inputs = torch.randn(8, 64, generator=generator)
        loss = (model(inputs) - 0.5).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.filterwarnings("ignore:Paged optimizers are not supported on CPU")
@pytest.mark.parametrize("make_optimizer", [make_adamw, make_bnb("AdamW8bit"), make_bnb("PagedAdamW8bit")],
                         ids=["torch-AdamW", "bnb-AdamW8bit", "bnb-PagedAdamW8bit"])
def test_resume_continues_bitwise(tmp_path, make_optimizer):
    torch.manual_seed(0)
    model = nn.Linear(64, 128)  # 8192 weights: above bitsandbytes' 4096 minimum for 8-bit state
    optimizer = make_optimizer(model.parameters())
    data = torch.Generator().manual_seed(1)
    train(model, optimizer, data, steps=2)
    folder = save_checkpoint(tmp_path / "checkpoint", tensors=trainable_tensors(model),
                             optimizer_state=optimizer.state_dict(), state={"step": 2, "data": data.get_state()},
                             config={"optimizer": type(optimizer).__name__})
    train(model, optimizer, data, steps=3)  # the run goes on uninterrupted

    loaded = load_checkpoint(folder)
    if "8bit" in type(optimizer).__name__:  # the 8-bit state itself went through the file
        quantized = loaded.optimizer_state["state"][0]["__bnb_optimizer_quant_state__"]
        assert quantized["state1"].dtype == torch.uint8
    torch.manual_seed(123)  # a fresh model from a different init: everything must come from the checkpoint
    resumed = nn.Linear(64, 128)
    apply_trainable(resumed, loaded.tensors)
    resumed_optimizer = make_optimizer(resumed.parameters())
    resumed_optimizer.load_state_dict(loaded.optimizer_state)
    resumed_data = torch.Generator()
    resumed_data.set_state(loaded.state["data"])
    train(resumed, resumed_optimizer, resumed_data, steps=3)

    assert torch.equal(resumed.weight, model.weight)
    assert torch.equal(resumed.bias, model.bias)


# ---------------------------------------------------------------- overwriting and crashes


def test_refuses_overwrite_without_force(tmp_path):
    folder = small_checkpoint(tmp_path / "checkpoint", 1.0)
    with pytest.raises(FileExistsError, match=str(folder)):
        small_checkpoint(folder, 2.0)
    assert loaded_value(folder) == 1.0
    small_checkpoint(folder, 3.0, force=True)
    assert loaded_value(folder) == 3.0
    assert siblings(folder) == ["checkpoint"]


def test_force_never_replaces_a_folder_that_is_not_a_checkpoint(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "thesis.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="did not write as a checkpoint"):
        small_checkpoint(folder, 1.0, force=True)
    assert (folder / "thesis.txt").read_text() == "precious"
    (tmp_path / "empty").mkdir()
    assert loaded_value(small_checkpoint(tmp_path / "empty", 2.0, force=True)) == 2.0


def test_state_that_would_not_load_is_refused_at_save(tmp_path):
    class Opaque:
        pass

    with pytest.raises(ValueError, match=r"state\['rng'\]\['numpy'\] is a .*Opaque"):
        save_checkpoint(tmp_path / "checkpoint", tensors={"w": torch.ones(1)}, optimizer_state={},
                        state={"step": 1, "rng": {"numpy": Opaque()}}, config={})
    with pytest.raises(ValueError, match="config is not JSON-able"):
        save_checkpoint(tmp_path / "checkpoint", tensors={"w": torch.ones(1)}, optimizer_state={}, state={},
                        config={"x": Opaque()})
    with pytest.raises(ValueError, match="non-empty dict"):
        save_checkpoint(tmp_path / "checkpoint", tensors={}, optimizer_state={}, state={}, config={})
    assert list(tmp_path.iterdir()) == []


def write_part_then_fail(value, target, *args, **keywords):
    """Stands in for safetensors' save_file(tensors, path) and torch.save(value, path)."""
    with open(target, "wb") as file:
        file.write(b"\x00" * 100)  # part of a file, then the disk fills up
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("failing", ["safetensors", "torch.save"])
def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failing):
    folder = small_checkpoint(tmp_path / "checkpoint", 1.0)
    if failing == "safetensors":
        monkeypatch.setattr(checkpoint, "save_file", write_part_then_fail)
    else:
        monkeypatch.setattr(torch, "save", write_part_then_fail)
    with pytest.raises(OSError, match="No space left"):
        small_checkpoint(folder, 2.0, force=True)
    monkeypatch.undo()
    assert loaded_value(folder) == 1.0
    assert siblings(folder) == ["checkpoint"]  # an exception removes its partial folder itself


# What a killed replacing save leaves and how it is undone is earkit.io's (tests/test_io.py): here,
# that loading and saving a checkpoint undo it.
def test_a_save_killed_between_its_renames_is_undone_by_load_and_save(tmp_path):
    folder = small_checkpoint(tmp_path / "checkpoint", 1.0)
    (tmp_path / "checkpoint.partial-1-2").mkdir()  # the new checkpoint, half written
    folder.rename(tmp_path / "checkpoint.old-1-1")  # the previous one, renamed away
    assert loaded_value(folder) == 1.0  # load renames the .old-* back into place
    small_checkpoint(folder, 3.0, force=True)  # the next save removes the leftovers
    assert loaded_value(folder) == 3.0
    assert siblings(folder) == ["checkpoint"]


# ---------------------------------------------------------------- incomplete and corrupt checkpoints


@pytest.mark.parametrize("missing", checkpoint.CHECKPOINT_FILES)
def test_incomplete_checkpoint_names_the_missing_file(tmp_path, missing):
    folder = small_checkpoint(tmp_path / "checkpoint", 1.0)
    (folder / missing).unlink()
    with pytest.raises(FileNotFoundError, match=f"{folder}.*{missing} missing"):
        load_checkpoint(folder)


@pytest.mark.parametrize("corrupt", checkpoint.CHECKPOINT_FILES)
def test_corrupt_checkpoint_names_the_file(tmp_path, corrupt):
    folder = small_checkpoint(tmp_path / "checkpoint", 1.0)
    data = (folder / corrupt).read_bytes()
    (folder / corrupt).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"{folder}: {corrupt}"):
        load_checkpoint(folder)


def test_missing_checkpoint_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_checkpoint(tmp_path / "nowhere")


# ---------------------------------------------------------------- applying and exporting


def test_apply_trainable_checks_every_name_before_copying():
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match="not parameters of this Sequential: 2.weight"):
        apply_trainable(model, {"0.weight": torch.zeros(4, 3), "2.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"1.weight: checkpoint \(4, 2\), model \(2, 4\)"):
        apply_trainable(model, {"0.weight": torch.zeros(4, 3), "1.weight": torch.zeros(4, 2)})
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name])  # nothing half-applied
    apply_trainable(model, {"1.bias": torch.tensor([1.0, 2.0], dtype=torch.float64)})
    assert torch.equal(model[1].bias, torch.tensor([1.0, 2.0])) and model[1].bias.dtype == torch.float32


VOCABULARY = ["red", "circle"]
EDITED = [f"model.language_model.layers.0.self_attn.{name}.weight" for name in ("q_proj", "k_proj", "v_proj", "o_proj")]


def edited_tensors(model) -> dict:
    parameters = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(7)
    return {name: parameters[name].detach() + 0.2 * torch.randn(parameters[name].shape, generator=generator)
            for name in EDITED}


def generation_logits(model, tokenizer) -> torch.Tensor:
    from earkit.engine.model import encode_prompts, image_hidden_states, image_logits, image_token_count

    prompts = encode_prompts(tokenizer, ["a red circle", "a circle"])
    codebook = model.config.vq_config.num_embeddings
    tokens = torch.randint(0, codebook, (2, image_token_count(model)), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return image_logits(model, image_hidden_states(model, prompts, tokens))


def load_exported(folder):
    from transformers import AutoTokenizer, JanusForConditionalGeneration

    return JanusForConditionalGeneration.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def test_export_model_loads_with_the_same_logits(tmp_path):
    from earkit.engine.tiny import build_tiny_janus

    model, tokenizer = build_tiny_janus(VOCABULARY)
    base_logits = generation_logits(model, tokenizer)
    apply_trainable(model, edited_tensors(model))
    logits = generation_logits(model, tokenizer)
    assert not torch.equal(logits, base_logits)  # the edit shows in the logits, so the comparison means something

    folder = export_model(model, tokenizer, tmp_path / "janus-edited")
    assert siblings(folder) == ["janus-edited"]
    exported, exported_tokenizer = load_exported(folder)
    assert torch.equal(generation_logits(exported, exported_tokenizer), logits)

    with pytest.raises(FileExistsError, match="janus-edited"):
        export_model(model, tokenizer, folder)
    export_model(model, tokenizer, folder, force=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="did not write as a model folder"):
        export_model(model, tokenizer, tmp_path / "other", force=True)


def test_export_checkpoint_applies_the_trained_tensors(tmp_path):
    from earkit.engine.tiny import save_tiny_janus

    base, tokenizer = save_tiny_janus(tmp_path / "base", VOCABULARY)
    tensors = edited_tensors(base)
    folder = save_checkpoint(tmp_path / "run" / "checkpoint", tensors=tensors, optimizer_state={}, state={"step": 1},
                             config={"lr": 1e-4}, base_model=tmp_path / "base")
    apply_trainable(base, tensors)
    expected = generation_logits(base, tokenizer)

    out = export_checkpoint(None, folder, tmp_path / "exported")  # the base model recorded in the checkpoint
    exported, exported_tokenizer = load_exported(out)
    assert exported.dtype == torch.float32  # the base folder's stored dtype
    assert torch.equal(generation_logits(exported, exported_tokenizer), expected)

    with pytest.raises(FileExistsError, match="exported"):
        export_checkpoint(tmp_path / "base", folder, out)
    out = export_checkpoint(tmp_path / "base", folder, out, force=True, dtype="bfloat16")
    exported, _ = load_exported(out)
    assert exported.model.language_model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert siblings(out) == ["base", "exported", "run"]  # no temporary folder left


def test_export_checkpoint_needs_a_base_model(tmp_path):
    folder = small_checkpoint(tmp_path / "checkpoint", 1.0)
    with pytest.raises(ValueError, match="records no base model"):
        export_checkpoint(None, folder, tmp_path / "out")


def test_an_export_opens_like_the_base_model_and_samples_with_transformers_generate(tmp_path):
    """The export of a ShapesWorld erasure: the base folder's other files carried over (its notes
    naming the same judge), AutoProcessor and JanusForConditionalGeneration open it, and
    transformers' own generate(generation_mode="image") draws from it."""
    from transformers import AutoProcessor, JanusForConditionalGeneration

    from earkit.ecgvf.judges import default_judge, parse_judge
    from earkit.engine.model import MODEL_NOTES
    from earkit.engine.shapesworld import erasure_pairs, generator_folder
    from earkit.engine.trainer import EraseConfig, erase

    base = generator_folder()
    run = erase(EraseConfig(model=str(base), out=str(tmp_path / "run"), concept="circle", anchor="square", steps=1,
                            batch_size=2, lr=1e-3, device="cpu"), pairs=erasure_pairs()[:2], progress=False)
    out = export_checkpoint(None, run.checkpoint, tmp_path / "export")
    base_names = {path.name for path in base.iterdir() if path.is_file()}
    export_names = {path.name for path in out.iterdir() if path.is_file()}
    assert base_names <= export_names and "processor_config.json" in export_names
    for name in ("prompt_vocabulary.json", "world.json", "patch_codes.safetensors"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    assert (out / "model.safetensors").read_bytes() != (base / "model.safetensors").read_bytes()
    # the notes name the same judge from the export's folder
    assert default_judge(out)[0] != default_judge(base)[0] and json.loads((out / MODEL_NOTES).read_text())
    assert parse_judge(None, model_folder=out).describe() == parse_judge(None, model_folder=base).describe()

    processor = AutoProcessor.from_pretrained(out)
    assert type(processor).__name__ == "JanusProcessor"
    model = JanusForConditionalGeneration.from_pretrained(out).eval()
    inputs = processor(text=["a red circle", "a photo of a blue star"], generation_mode="image", padding=True,
                       return_tensors="pt")
    torch.manual_seed(0)
    tokens = model.generate(**inputs, generation_mode="image", do_sample=True, guidance_scale=1.5,
                            max_new_tokens=model.config.vision_config.num_image_tokens)
    assert tokens.shape == (2, 64) and 0 <= int(tokens.min()) and int(tokens.max()) < 256
    assert model.decode_image_tokens(tokens).shape == (2, 64, 64, 3)
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["generation_kwargs"]["boi_token_id"] == processor.tokenizer.convert_tokens_to_ids(
        "<begin_of_image>") and generation["pad_token_id"] == processor.tokenizer.pad_token_id
