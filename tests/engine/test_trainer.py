"""The erasure trainer on a tiny random Janus (real transformers classes) on CPU."""


import pytest
import torch

from earkit.cli import main as cli_main
from earkit.engine.checkpoint import load_checkpoint
from earkit.engine.model import encode_prompts, image_hidden_states, image_logits, load_janus
from earkit.engine.pair_files import pairs_from_concept
from earkit.engine.sampler import derived_seed
from earkit.engine.tiny import save_tiny_janus
from earkit.engine import objectives
from earkit.engine.distributed import Ranks
from earkit.engine.trainer import (
    EraseConfig, FrozenTeacher, erase, make_optimizer, select_trainable, shard_rows, teacher_targets, train_step,
    windows,
)

from helpers import erase_killed_after_two_steps

WORDS = ["red", "blue", "circle", "square", "star", "cross", "triangle"]


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-janus")
    save_tiny_janus(folder, WORDS, seed=0)  # 16 image tokens, 128 codes, 2 layers
    return str(folder)


def config(folder, out, **overrides):
    options = dict(model=folder, out=str(out), concept="circle", anchor="square", window=5, steps=2,
                   optimizer="adamw8bit", lr=1e-3, device="cpu", seed=3)
    options.update(overrides)
    return EraseConfig(**options)


def test_windows_cover_every_position_once():
    assert windows(16, 5, "sequential") == [(0, 5), (5, 10), (10, 15), (15, 16)]
    assert windows(16, 5, "parallel") == [(0, 16)]


@pytest.mark.parametrize("objective", ["token-kl", "hidden-mse"])
def test_sequential_steps_once_per_window_parallel_once_per_batch(tiny_model_folder, tmp_path, objective):
    # T = 16 tokens and W = 5 make 4 windows, the last one short.
    sequential = erase(config(tiny_model_folder, tmp_path / "seq", wga="sequential", objective=objective),
                       progress=False)
    parallel = erase(config(tiny_model_folder, tmp_path / "par", wga="parallel", objective=objective),
                     progress=False)
    assert sequential.optimizer_steps == 2 * 4
    assert parallel.optimizer_steps == 2
    assert all(loss > 0 for loss in parallel.losses)


def step_on_fresh_model(folder, **overrides):
    model, tokenizer = load_janus(folder, device="cpu")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    run = config(folder, "unused", **overrides)
    trainable = select_trainable(model, run.trainable)
    teacher = FrozenTeacher(trainable)
    optimizer = make_optimizer(run.optimizer, trainable.values(), run.lr, run.weight_decay)
    pairs = pairs_from_concept("circle", "square")
    stats = [train_step(model, tokenizer, teacher, optimizer, pairs[:2], step, run, list(trainable.values()))
             for step in range(2)]
    return model, before, trainable, teacher, stats


def test_only_selected_modules_change_and_the_teacher_stays_frozen(tiny_model_folder):
    model, before, trainable, teacher, stats = step_on_fresh_model(tiny_model_folder)
    assert set(trainable) == {n for n in before if n.startswith("model.language_model.layers.") and ".self_attn." in n}
    for name, parameter in model.named_parameters():
        changed = not torch.equal(parameter.detach(), before[name])
        assert changed == (name in trainable), name
    for name, tensor in teacher.tensors.items():
        assert torch.equal(tensor, before[name])
    assert all(s["optimizer_steps"] == 1 for s in stats)


def test_window_threshold_above_every_window_changes_no_weight(tiny_model_folder):
    # The contract forbids an infinite threshold; 1e30 is above any window's loss.
    model, before, _, _, stats = step_on_fresh_model(tiny_model_folder, window_threshold=1e30)
    assert all(s["optimizer_steps"] == 0 and s["kept"] == 0.0 for s in stats)
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter.detach(), before[name]), name


def test_teacher_forced_student_matches_teacher_before_any_step(tiny_model_folder):
    # At step 0 the student is the teacher: with anchor == concept the token-kl loss is 0.
    model, tokenizer = load_janus(tiny_model_folder, device="cpu")
    batch = encode_prompts(tokenizer, ["a red circle"])
    tokens = torch.randint(0, 128, (1, 16))
    logits = image_logits(model, image_hidden_states(model, batch, tokens))
    from earkit.kernels import guided_cross_entropy

    assert float(guided_cross_entropy(logits, logits, logits).detach()) < 1e-6


def test_a_killed_run_resumes_to_the_uninterrupted_result(tiny_model_folder, tmp_path):
    killed = tmp_path / "killed"
    erase_killed_after_two_steps(tmp_path, **config(tiny_model_folder, killed, steps=4, save_every=1,
                                                    batch_size=2).to_json())
    assert load_checkpoint(killed / "checkpoint").state["step"] == 2
    resumed = erase(config(tiny_model_folder, killed, steps=4, save_every=1, batch_size=2, resume=True),
                    progress=False)
    straight = erase(config(tiny_model_folder, tmp_path / "straight", steps=4, save_every=1, batch_size=2),
                     progress=False)
    assert resumed.losses == straight.losses
    got = load_checkpoint(resumed.checkpoint).tensors
    want = load_checkpoint(straight.checkpoint).tensors
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_export_round_trip_gives_the_trained_logits(tiny_model_folder, tmp_path):
    run = erase(config(tiny_model_folder, tmp_path / "run"), progress=False)
    exported = tmp_path / "exported"
    assert cli_main(["export", "--model", tiny_model_folder, "--checkpoint", str(run.checkpoint),
                     "--out", str(exported)]) == 0
    trained, tokenizer = load_janus(tiny_model_folder, device="cpu")
    from earkit.engine.checkpoint import apply_trainable

    apply_trainable(trained, load_checkpoint(run.checkpoint).tensors)
    reloaded, reloaded_tokenizer = load_janus(exported, device="cpu")
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle", "a blue star"]
    want = image_logits(trained, image_hidden_states(trained, encode_prompts(tokenizer, prompts), tokens))
    got = image_logits(reloaded, image_hidden_states(reloaded, encode_prompts(reloaded_tokenizer, prompts), tokens))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    base, _ = load_janus(tiny_model_folder, device="cpu")
    assert not torch.equal(image_logits(base, image_hidden_states(base, encode_prompts(tokenizer, prompts), tokens)),
                           want)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--model", "{tmp}/no-such-model"], "does not exist"),
        (["--concept", "circle", "--anchor", " Circle "], "concept"),
        (["--pairs", "{tmp}/empty.jsonl"], "empty"),
        (["--pairs", "{tmp}/broken.jsonl"], "broken.jsonl"),
        (["--window", "0"], "window"),
        (["--trainable", "model.no_such_module.*"], "match no parameter"),
        (["--out", "{tmp}/occupied"], "exists"),
        (["--preserve", "{tmp}/no-such-prompts.txt"], "no-such-prompts.txt"),
        (["--preserve", "{tmp}/empty.jsonl"], "empty"),
        (["--preserve-weight", "-1"], "preserve_weight"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(tiny_model_folder, tmp_path, capsys, arguments, message):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "broken.jsonl").write_text('{"concept_prompt": "a circle", "anchor_prompt": "a square"}\n{oops\n')
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "something").write_text("keep me")
    base = {"--model": tiny_model_folder, "--out": str(tmp_path / "out"), "--concept": "circle",
            "--anchor": "square"}
    given = [a.format(tmp=tmp_path) for a in arguments]
    for flag in list(base):
        if flag in given or (flag in ("--concept", "--anchor") and "--pairs" in given):
            base.pop(flag)
    argv = ["erase", "--steps", "1", "--device", "cpu"] + [x for kv in base.items() for x in kv] + given
    assert cli_main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error, error
    assert (tmp_path / "occupied" / "something").read_text() == "keep me"


def preserve_drift(folder, checkpoint, prompts):
    """Mean KL(base || trained) over the base model's teacher-forced image logits of `prompts`."""
    from earkit.engine.checkpoint import apply_trainable
    from earkit.engine.sampler import sample_image_tokens

    base, tokenizer = load_janus(folder, device="cpu")
    trained, _ = load_janus(folder, device="cpu")
    apply_trainable(trained, load_checkpoint(checkpoint).tensors)
    tokens = sample_image_tokens(base, tokenizer, prompts, seed=11, progress=False)
    batch = encode_prompts(tokenizer, prompts)
    with torch.no_grad():
        p = image_logits(base, image_hidden_states(base, batch, tokens)).double().log_softmax(-1)
        q = image_logits(trained, image_hidden_states(trained, batch, tokens)).double().log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_preservation_keeps_the_preserve_prompts_closer_to_the_base(tiny_model_folder, tmp_path):
    keep = ["a blue star", "a red cross", "a blue triangle", "a red star"]
    options = dict(steps=6, lr=3e-3, batch_size=2, eta=1.0)
    plain = erase(config(tiny_model_folder, tmp_path / "plain", **options), progress=False)
    held = erase(config(tiny_model_folder, tmp_path / "held", preserve_weight=30.0, **options), preserve=keep,
                 progress=False)
    assert plain.preserve_losses == [] and len(held.preserve_losses) == 6
    assert held.preserve_losses[0] < 1e-6  # the student starts as the teacher: nothing to preserve yet
    assert max(held.preserve_losses) > 0
    drift_plain = preserve_drift(tiny_model_folder, plain.checkpoint, keep)
    drift_held = preserve_drift(tiny_model_folder, held.checkpoint, keep)
    assert drift_held < 0.5 * drift_plain, (drift_held, drift_plain)


def test_preserve_prompts_from_a_file_and_a_deterministic_run(tiny_model_folder, tmp_path):
    import json

    prompts = tmp_path / "keep.txt"
    prompts.write_text("a blue star\n\na red cross\n")
    runs = [erase(config(tiny_model_folder, tmp_path / name, preserve=str(prompts), preserve_weight=5.0, steps=2),
                  progress=False) for name in ("one", "two")]
    assert runs[0].losses == runs[1].losses and runs[0].preserve_losses == runs[1].preserve_losses
    metrics = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert metrics["preserve_losses"] == runs[0].preserve_losses
    assert metrics["config"]["preserve"] == str(prompts) and metrics["config"]["preserve_weight"] == 5.0


def test_preserve_weight_zero_is_the_plain_erasure(tiny_model_folder, tmp_path):
    plain = erase(config(tiny_model_folder, tmp_path / "plain"), progress=False)
    zero = erase(config(tiny_model_folder, tmp_path / "zero", preserve_weight=0.0), preserve=["a blue star"],
                 progress=False)
    assert zero.losses == plain.losses
    got, want = load_checkpoint(zero.checkpoint).tensors, load_checkpoint(plain.checkpoint).tensors
    assert all(torch.equal(got[name], want[name]) for name in want)


@pytest.mark.parametrize("objective", ["token-kl", "hidden-mse"])
def test_preservation_in_sequential_windows_and_with_either_objective(tiny_model_folder, tmp_path, objective):
    # T = 16 tokens and W = 5: 4 windows, each with its own preservation term and optimizer step
    run = erase(config(tiny_model_folder, tmp_path / "run", wga="sequential", objective=objective,
                       preserve_weight=2.0), preserve=["a blue star", "a red cross"], progress=False)
    assert run.optimizer_steps == 2 * 4
    assert len(run.preserve_losses) == 2 and run.preserve_losses[0] >= 0
    # the first window of the first step sees the untouched student: its term is 0, the later ones are not
    assert max(run.preserve_losses) > 0


# ---------------------------------------------------------------- a step's rows shared over ranks


def test_shard_rows_split_a_batch_contiguously_and_evenly():
    for count in range(9):
        for world in range(1, 5):
            parts = [shard_rows(count, Ranks(rank, world)) for rank in range(world)]
            assert [row for part in parts for row in part] == list(range(count)), (count, world)
            sizes = [len(part) for part in parts]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True), (count, world)
    assert shard_rows(1, Ranks(1, 2)) == range(1, 1)  # a rank beyond a small batch has none


def mean_loss(token_loss, weight):
    """The objectives' reduction="mean", in float64: sum a_i l_i / max(1, sum a_i)."""
    return (weight * token_loss).sum() / weight.sum().clamp_min(1.0)


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_scaled_shard_losses_and_gradients_add_up_to_the_whole_batch(world):
    # 4 rows, some tokens dropped (weights 0), one row dropped whole; 5 ranks leave one rank empty
    generator = torch.Generator().manual_seed(world)
    token_loss = torch.rand(4, 10, dtype=torch.float64, generator=generator).requires_grad_()
    weight = (torch.rand(4, 10, generator=generator) > 0.4).double()
    weight[2] = 0
    whole = mean_loss(token_loss, weight)
    (whole_grad,) = torch.autograd.grad(whole, token_loss)
    total = objectives.SumOf()
    shards = [shard_rows(4, Ranks(rank, world)) for rank in range(world)]
    for rows in shards:
        part = slice(rows.start, rows.stop)
        if rows:
            total = total + objectives.SumOf.of(mean_loss(token_loss[part], weight[part]), weight[part])
    assert total.mean() == pytest.approx(float(whole), rel=1e-12)
    assert total.kept_fraction() == pytest.approx(float(weight.mean()), rel=1e-12)
    combined = sum(mean_loss(token_loss[rows.start:rows.stop], weight[rows.start:rows.stop])
                   * objectives.shard_scale(float(weight[rows.start:rows.stop].sum()), total.weight_sum)
                   for rows in shards if rows)
    assert float(combined) == pytest.approx(float(whole), rel=1e-12)
    (combined_grad,) = torch.autograd.grad(combined, token_loss)
    torch.testing.assert_close(combined_grad, whole_grad, rtol=1e-12, atol=0)


@pytest.mark.parametrize("objective", ["token-kl", "hidden-mse"])
def test_an_objectives_weights_of_a_row_do_not_depend_on_the_other_rows(objective):
    # What makes the split exact: the threshold and the window gate act within a row, so a shard's
    # weights are the whole batch's rows, and its scaled losses add up to the whole batch's.
    from earkit.kernels import guided_cross_entropy

    generator = torch.Generator().manual_seed(1)
    student, concept, anchor = (torch.randn(3, 12, 8, generator=generator) for _ in range(3))

    def loss_and_weight(rows):
        if objective == "hidden-mse":  # token losses about 6 here, KLs about 1.3
            return objectives.hidden_mse(student[rows], objectives.TeacherStates(concept[rows], anchor[rows]), eta=1.0,
                                         token_threshold=4.0, window=4, window_threshold=18.0)
        return guided_cross_entropy(student[rows], concept[rows], anchor[rows], eta=1.0, threshold=1.0, window=4,
                                    window_threshold=2.0, reduction="mean", return_weights=True)

    whole_loss, whole_weight = loss_and_weight(slice(0, 3))
    assert 0 < float(whole_weight.float().mean()) < 1  # some tokens dropped, some kept
    assert bool((whole_weight.reshape(3, 3, 4).sum(-1) == 0).any())  # and a window gated
    parts = [loss_and_weight(slice(0, 2)), loss_and_weight(slice(2, 3))]
    assert torch.equal(torch.cat([weight for _, weight in parts]), whole_weight)
    total = float(whole_weight.sum())
    combined = sum(float(loss) * objectives.shard_scale(float(weight.sum()), total) for loss, weight in parts)
    assert combined == pytest.approx(float(whole_loss), rel=1e-5)


def test_an_image_is_the_same_whichever_rows_share_its_shard(tiny_model_folder):
    # Each row's seed is derived from (run seed, step, stream, its row in the whole batch).
    model, tokenizer = load_janus(tiny_model_folder, device="cpu")
    run = config(tiny_model_folder, "unused", images_per_prompt=2)
    teacher = FrozenTeacher(select_trainable(model, run.trainable))
    pairs = pairs_from_concept("circle", "square")[:2]  # 2 pairs x 2 images: 4 rows, prompt-major
    whole = teacher_targets(model, tokenizer, teacher, pairs, 3, run)
    tail = teacher_targets(model, tokenizer, teacher, pairs, 3, run, rows=range(1, 4))
    assert torch.equal(tail.tokens, whole.tokens[1:4])
    assert not torch.equal(whole.tokens[0], whole.tokens[1])  # one prompt's two images differ
    assert teacher_targets(model, tokenizer, teacher, pairs, 3, run, rows=range(4, 4)) is None
    other_step = teacher_targets(model, tokenizer, teacher, pairs, 4, run)
    assert not torch.equal(other_step.tokens, whole.tokens)


@pytest.mark.parametrize("step, where", [(2, "prefix"), (3, "suffix")])
def test_robust_rows_are_the_plain_rows_again_under_the_prompts_an_attack_found(tiny_model_folder, step, where):
    from earkit.engine import attacks

    model, tokenizer = load_janus(tiny_model_folder, device="cpu")
    plain_run = config(tiny_model_folder, "unused")
    robust_run = config(tiny_model_folder, "unused", robust=True, robust_tokens=2, robust_steps=3)
    teacher = FrozenTeacher(select_trainable(model, plain_run.trainable))
    pairs = pairs_from_concept("circle", "square")[:2]
    plain = teacher_targets(model, tokenizer, teacher, pairs, step, plain_run)
    robust = teacher_targets(model, tokenizer, teacher, pairs, step, robust_run)
    assert torch.equal(robust.tokens, torch.cat([plain.tokens, plain.tokens]))
    assert torch.equal(robust.concept, torch.cat([plain.concept, plain.concept]))
    assert torch.equal(robust.anchor, torch.cat([plain.anchor, plain.anchor]))
    # the extra rows' prompts: what the attack finds on the current model, from the step's own seed
    prompts = [pair.concept_prompt for pair in pairs]
    # (a prompt that is the concept alone keeps it: nothing would be left to attack)
    attacked = prompts if where == "prefix" else [attacks.without_concept(p, "circle") or p for p in prompts]
    assert where == "prefix" or attacked != prompts
    found = attacks.soft_prompt_attack(model, tokenizer, attacked, plain.tokens, n_tokens=2, steps=3, where=where,
                                       seed=derived_seed(3, step, 2), batch_size=None)
    want = encode_prompts(tokenizer, prompts + found.prompts)
    assert torch.equal(robust.concept_batch.input_ids, want.input_ids)
    if where == "suffix":
        assert [text.split()[:-2] for text in found.prompts] == [text.split() for text in attacked]


def test_a_robust_run_is_deterministic_and_refuses_a_changed_attack_on_resume(tiny_model_folder, tmp_path):
    options = dict(robust=True, robust_tokens=2, robust_steps=2, steps=2, batch_size=2)
    first = erase(config(tiny_model_folder, tmp_path / "a", **options), progress=False)
    second = erase(config(tiny_model_folder, tmp_path / "b", **options), progress=False)
    plain = erase(config(tiny_model_folder, tmp_path / "c", steps=2, batch_size=2), progress=False)
    assert first.losses == second.losses and first.losses != plain.losses
    got, want = load_checkpoint(first.checkpoint).tensors, load_checkpoint(second.checkpoint).tensors
    assert all(torch.equal(got[name], want[name]) for name in want)
    with pytest.raises(ValueError, match="robust_steps"):
        erase(config(tiny_model_folder, tmp_path / "a", **{**options, "robust_steps": 3, "steps": 3}, resume=True),
              progress=False)
    for name in ("robust_tokens", "robust_steps"):
        with pytest.raises(ValueError, match=name):
            config(tiny_model_folder, tmp_path / "d", **{name: 0}).validate()
