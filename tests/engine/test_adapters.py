"""LoRA adapters (engine/adapters.py): training through peft, the PEFT folder an adapter run writes,
merged and stacked application, export --merge. References are float64 recomputations from the
safetensors files, and peft's own PeftModel."""

import json

import peft  # a dependency of earkit: missing, these tests fail rather than skip
import pytest
import torch
from safetensors.torch import load_file

from earkit.engine.adapters import (
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterStack, attach_lora, lora_target_modules, merged_weights,
)
from earkit.engine.checkpoint import apply_trainable, erasure_tensors, export_checkpoint, load_checkpoint
from earkit.engine.model import encode_prompts, image_hidden_states, image_logits, load_janus
from earkit.engine.tiny import save_tiny_janus
from earkit.engine.trainer import EraseConfig, erase

from helpers import erase_killed_after_two_steps


WORDS = ["red", "blue", "circle", "square", "star", "cross", "triangle"]
ATTENTION = ("model.language_model.layers.*.self_attn.*",)


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-janus")
    save_tiny_janus(folder, WORDS, seed=0)
    return str(folder)


def config(folder, out, **overrides):
    options = dict(model=folder, out=str(out), concept="circle", anchor="square", window=5, steps=2,
                   optimizer="adamw8bit", lr=1e-2, device="cpu", seed=3, adapter="lora", lora_rank=2,
                   trainable=ATTENTION)
    options.update(overrides)
    return EraseConfig(**options)


def logits_of(model, tokenizer, prompts=("a red circle", "a blue star")):
    batch = encode_prompts(tokenizer, list(prompts), torch.device("cpu"))
    tokens = torch.arange(batch.input_ids.shape[0] * 16).reshape(-1, 16) % 100
    with torch.no_grad():
        return image_logits(model, image_hidden_states(model, batch, tokens))


def lora_deltas64(folder) -> dict[str, torch.Tensor]:
    """(alpha / r) B @ A of every adapted module, in float64, from the adapter's own files."""
    record = json.loads((folder / ADAPTER_CONFIG).read_text())
    tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    scale = record["lora_alpha"] / record["r"]
    deltas = {}
    for name, a in tensors.items():
        if ".lora_A." not in name:
            continue
        b = tensors[name.replace(".lora_A.", ".lora_B.")]
        module = name.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        deltas[f"{module}.weight"] = scale * (b.double() @ a.double())
    return deltas


def test_an_adapter_run_writes_a_peft_folder_that_peft_loads_to_the_merged_model(tiny_model_folder, tmp_path):
    from transformers import JanusForConditionalGeneration

    run = erase(config(tiny_model_folder, tmp_path / "run", steps=3), progress=False)
    folder = run.checkpoint
    assert (folder / ADAPTER_CONFIG).is_file() and (folder / ADAPTER_WEIGHTS).is_file()
    record = json.loads((folder / ADAPTER_CONFIG).read_text())
    assert record["peft_type"] == "LORA" and record["r"] == 2 and record["lora_alpha"] == 4
    assert len(record["target_modules"]) == 8  # q, k, v, o of the tiny model's 2 layers
    # only A and B were trained: the checkpoint's tensors are the adapter's, by parameter name
    trained = load_checkpoint(folder).tensors
    assert trained and all(".lora_A." in name or ".lora_B." in name for name in trained)
    deltas = lora_deltas64(folder)
    assert len(deltas) == 8 and all(delta.abs().max() > 0 for delta in deltas.values())  # B moved off zero

    base, tokenizer = load_janus(tiny_model_folder, device="cpu", dtype="fp32")
    base_weights = {name: p.detach().clone() for name, p in base.named_parameters()}
    merged = erasure_tensors(base, folder)
    assert merged.keys() == deltas.keys()
    for name, delta in deltas.items():
        torch.testing.assert_close(merged[name].double(), base_weights[name].double() + delta, rtol=0, atol=1e-6)
    # the model merged_weights looked through is the model it was: names, values, requires_grad
    after = dict(base.named_parameters())
    assert after.keys() == base_weights.keys()
    assert all(torch.equal(after[name], base_weights[name]) and after[name].requires_grad for name in after)

    apply_trainable(base, merged)
    with_peft = peft.PeftModel.from_pretrained(JanusForConditionalGeneration.from_pretrained(tiny_model_folder),
                                               str(folder)).eval()
    torch.testing.assert_close(logits_of(base, tokenizer), logits_of(with_peft.get_base_model(), tokenizer),
                               rtol=1e-5, atol=1e-5)


def test_lora_starts_as_the_base_model_from_its_seed_and_trains_only_the_adapters(tiny_model_folder):
    model, tokenizer = load_janus(tiny_model_folder, device="cpu", dtype="fp32")
    before = logits_of(model, tokenizer)
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    wrapped, trainable = attach_lora(model, ATTENTION, rank=2, alpha=4, dropout=0.0, seed=5)
    assert torch.equal(logits_of(model, tokenizer), before)  # B = 0
    assert sorted(name for name, p in model.named_parameters() if p.requires_grad) == sorted(trainable)
    assert len(trainable) == 16 and all(".lora_" in name for name in trainable)
    again, _ = attach_lora(load_janus(tiny_model_folder, device="cpu", dtype="fp32")[0], ATTENTION, rank=2, alpha=4,
                           dropout=0.0, seed=5)
    other = dict(again.get_base_model().named_parameters())
    assert all(torch.equal(p, other[name]) for name, p in trainable.items())  # A from the seed alone
    with torch.no_grad():
        for name, parameter in trainable.items():
            parameter.add_(0.1)
    assert not torch.allclose(logits_of(model, tokenizer), before)
    with wrapped.disable_adapter():  # the teacher: the adapter switched off is the base model exactly
        assert torch.equal(logits_of(model, tokenizer), before)
    frozen = {name: p for name, p in model.named_parameters() if ".lora_" not in name}
    assert all(torch.equal(p, weights[name.replace(".base_layer", "")]) for name, p in frozen.items())


def test_a_killed_adapter_run_resumes_bit_for_bit(tiny_model_folder, tmp_path):
    killed = tmp_path / "killed"
    options = dict(steps=4, save_every=1, batch_size=2, lora_dropout=0.25)  # dropout draws from the saved RNG
    erase_killed_after_two_steps(tmp_path, **config(tiny_model_folder, killed, **options).to_json())
    assert load_checkpoint(killed / "checkpoint").state["step"] == 2
    resumed = erase(config(tiny_model_folder, killed, resume=True, **options), progress=False)
    straight = erase(config(tiny_model_folder, tmp_path / "straight", **options), progress=False)
    assert resumed.losses == straight.losses
    got, want = load_checkpoint(resumed.checkpoint).tensors, load_checkpoint(straight.checkpoint).tensors
    assert got.keys() == want.keys() and all(torch.equal(got[name], want[name]) for name in want)
    assert (resumed.checkpoint / ADAPTER_WEIGHTS).read_bytes() == (straight.checkpoint / ADAPTER_WEIGHTS).read_bytes()
    with pytest.raises(ValueError, match="lora_rank differs"):
        erase(config(tiny_model_folder, killed, resume=True, **{**options, "lora_rank": 4}), progress=False)


def random_adapter(model_folder, out, *, rank, alpha, seed, targets=("q_proj", "v_proj")):
    """A PEFT LoRA folder with random A and B (peft's own save_pretrained)."""
    from transformers import JanusForConditionalGeneration

    model = JanusForConditionalGeneration.from_pretrained(model_folder)
    names = [name for name in lora_target_modules(model, ATTENTION) if name.endswith(targets)]
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=names))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    wrapped.save_pretrained(str(out))
    return out


def test_stacked_adapters_add_their_weighted_deltas(tiny_model_folder, tmp_path):
    first = random_adapter(tiny_model_folder, tmp_path / "a", rank=2, alpha=4, seed=1)
    second = random_adapter(tiny_model_folder, tmp_path / "b", rank=3, alpha=3, seed=2, targets=("v_proj", "o_proj"))
    model, _ = load_janus(tiny_model_folder, device="cpu", dtype="fp32")
    weights = {name: p.detach().double() for name, p in model.named_parameters()}
    got = merged_weights(model, [first, second], [0.5, -2.0])
    one, two = lora_deltas64(first), lora_deltas64(second)
    assert got.keys() == one.keys() | two.keys()  # q (first only), v (both), o (second only)
    for name in got:
        want = weights[name] + 0.5 * one.get(name, 0) - 2.0 * two.get(name, 0)
        torch.testing.assert_close(got[name].double(), want, rtol=0, atol=1e-6)
    # through the stack type the commands pass around, and a single weighted adapter
    assert all(torch.equal(got[name], value) for name, value in
               erasure_tensors(model, AdapterStack((first, second), (0.5, -2.0))).items())
    half = merged_weights(model, [first], [0.5])
    for name in half:
        torch.testing.assert_close(half[name].double(), weights[name] + 0.5 * one[name], rtol=0, atol=1e-6)


def test_adapters_that_earkit_cannot_apply_are_refused_by_name(tiny_model_folder, tmp_path):
    model, _ = load_janus(tiny_model_folder, device="cpu", dtype="fp32")
    good = random_adapter(tiny_model_folder, tmp_path / "good", rank=2, alpha=4, seed=1)
    record = json.loads((good / ADAPTER_CONFIG).read_text())

    def variant(name, change=None, drop=None):
        folder = tmp_path / name
        folder.mkdir()
        (folder / ADAPTER_CONFIG).write_text(json.dumps({**record, **(change or {})}))
        if drop != ADAPTER_WEIGHTS:
            (folder / ADAPTER_WEIGHTS).write_bytes((good / ADAPTER_WEIGHTS).read_bytes())
        return folder

    with pytest.raises(ValueError, match="'PREFIX_TUNING' adapter"):
        merged_weights(model, [variant("prefix", {"peft_type": "PREFIX_TUNING"})])
    with pytest.raises(ValueError, match="DoRA"):
        merged_weights(model, [variant("dora", {"use_dora": True})])
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors is missing"):
        merged_weights(model, [variant("empty", drop=ADAPTER_WEIGHTS)])
    broken = variant("broken")
    (broken / ADAPTER_CONFIG).write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json is unreadable"):
        merged_weights(model, [broken])
    wide = tmp_path / "wide-model"
    save_tiny_janus(wide, WORDS, seed=0, hidden_size=48)
    with pytest.raises(ValueError, match="does not fit the model"):
        merged_weights(load_janus(str(wide), device="cpu", dtype="fp32")[0], [good])
    with pytest.raises(ValueError, match="one weight per adapter"):
        merged_weights(model, [good, good], [1.0])
    with pytest.raises(ValueError, match="finite"):
        merged_weights(model, [good], [float("nan")])
    # a refusal leaves the model untouched
    assert all(".lora_" not in name and ".base_layer" not in name for name, _ in model.named_parameters())


def test_export_merge_folds_the_adapter_in_and_is_needed(tiny_model_folder, tmp_path):
    from transformers import JanusForConditionalGeneration

    run = erase(config(tiny_model_folder, tmp_path / "run"), progress=False)
    with pytest.raises(ValueError, match="give --merge"):
        export_checkpoint(None, run.checkpoint, tmp_path / "plain")
    full = erase(config(tiny_model_folder, tmp_path / "full", adapter=None, lora_rank=8, lr=1e-3), progress=False)
    with pytest.raises(ValueError, match="not an adapter folder"):
        export_checkpoint(None, full.checkpoint, tmp_path / "merged-full", merge=True)
    exported = export_checkpoint(None, run.checkpoint, tmp_path / "merged", merge=True)
    model = JanusForConditionalGeneration.from_pretrained(exported)
    base = dict(JanusForConditionalGeneration.from_pretrained(tiny_model_folder).named_parameters())
    deltas = lora_deltas64(run.checkpoint)
    for name, parameter in model.named_parameters():
        want = base[name].double() + deltas.get(name, 0)
        torch.testing.assert_close(parameter.double(), want, rtol=0, atol=1e-6)
    # a bare PEFT folder (no earkit files) exports too, its base model given
    bare = random_adapter(tiny_model_folder, tmp_path / "bare", rank=2, alpha=4, seed=1)
    export_checkpoint(tiny_model_folder, bare, tmp_path / "merged-bare", merge=True)


def test_lora_settings_are_checked_before_anything_loads(tiny_model_folder, tmp_path):
    for overrides, message in [({"lora_rank": 0}, "lora_rank must be an integer >= 1"),
                               ({"lora_alpha": -1.0}, "lora_alpha must be > 0"),
                               ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
                               ({"adapter": "qlora"}, "adapter must be one of"),
                               ({"adapter": None, "lora_rank": 4}, "lora_rank applies to adapters"),
                               ({"trainable": ("model.language_model.norm.*",)}, "name no Linear module")]:
        with pytest.raises(ValueError, match=message):
            erase(config(tiny_model_folder, tmp_path / "never", **overrides), progress=False)
        assert not (tmp_path / "never").exists()


def test_several_concepts_make_one_run_over_all_their_pairs(tiny_model_folder, tmp_path):
    from earkit.engine.pair_files import pairs_from_concept

    both = config(tiny_model_folder, tmp_path / "both", concept=("circle", "star"), anchor="square")
    assert both.prompt_pairs() == pairs_from_concept("circle", "square") + pairs_from_concept("star", "square")
    each = config(tiny_model_folder, tmp_path / "each", concept=("circle", "star"), anchor=("square", "cross"))
    assert each.prompt_pairs()[-1] == pairs_from_concept("star", "cross")[-1]
    for concept, anchor, message in [(("circle", "star"), ("square", "cross", "red"), "3 anchors for 2 concepts"),
                                     (("circle", "Circle"), "square", "given twice"),
                                     (("circle", 3), "square", "list of strings")]:
        with pytest.raises(ValueError, match=message):
            config(tiny_model_folder, tmp_path / "bad", concept=concept, anchor=anchor).validate()
    run = erase(both, progress=False)
    saved = load_checkpoint(run.checkpoint).config
    assert saved["erase"]["concept"] == ["circle", "star"]
    assert saved["data"]["pairs"] == len(both.prompt_pairs())
    # a pairs file that mixes concepts is the same run as naming them: the same pairs, the same tensors
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps({"concept_prompt": pair.concept_prompt, "anchor_prompt": pair.anchor_prompt,
                                         "concept": pair.concept, "anchor": pair.anchor}) + "\n"
                             for pair in both.prompt_pairs()))
    from_file = erase(config(tiny_model_folder, tmp_path / "from-file", concept=None, anchor=None, pairs=str(mixed)),
                      progress=False)
    assert from_file.losses == run.losses
    got, want = load_checkpoint(from_file.checkpoint).tensors, load_checkpoint(run.checkpoint).tensors
    assert all(torch.equal(got[name], want[name]) for name in want)
