"""`python -m earkit.bench scaling`: the roofline arithmetic by hand for a made-up shape, the
plan's whole batches per rank, one-line refusals, and a quick real run on 1 and 2 torchrun ranks."""

import os
import subprocess
import sys

import pytest

from earkit.bench import scaling
from earkit.bench.__main__ import main as bench_main

# 2 layers, hidden 8, 2 heads (head dim 4) and 1 KV head, MLP 16, codebook 32, code width 4, 3 image tokens.
SMALL = scaling.DecoderShape(layers=2, hidden=8, heads=2, kv_heads=1, intermediate=16, image_vocab=32,
                             image_embed=4, image_tokens=3)


def test_decode_weights_and_kv_bytes_by_hand():
    # a layer: q 8x8 + o 8x8 + k 8x4 + v 8x4 = 192, MLP 3 x 8 x 16 = 384 -> 576, two layers 1152;
    # image head 8x8 + 8x32 = 320; aligner 4x8 + 8x8 = 96
    assert SMALL.decode_parameters() == 1152 + 320 + 96 == 1568
    assert SMALL.kv_bytes_per_token() == 2 * 2 * 1 * 4 * 2 == 32  # K and V, 2 layers, 1 head of 4, bf16
    # a step of 2 rows at context 5: weights once (3136 bytes) + 2 x 5 tokens x 32 bytes;
    # flops 2 x 1568 x 2 + attention 4 x 2 layers x 2 heads x 4 x 5 x 2 rows
    assert scaling.decode_step(SMALL, rows=2, context=5) == (3136 + 320, 6272 + 640)


def test_roofline_seconds_per_image_by_hand():
    slow_memory = scaling.Card("made-up", bandwidth=1000.0, flops=1e12, memory_gb=1)
    # batch 1 = 2 rows (CFG); prompt 2 tokens: steps at context 2, 3, 4
    # bytes: 3 x 3136 + 2 rows x (2 + 3 + 4) x 32 = 9984 -> 9.984 s at 1000 bytes/s
    one = scaling.roofline_batch(SMALL, slow_memory, batch=1, prompt_tokens=2)
    assert one["bytes"] == 9984 and one["seconds_per_batch"] == pytest.approx(9.984)
    assert one["seconds_per_image"] == pytest.approx(9.984) and one["memory_bound_steps"] == 3
    # batch 2 = 4 rows: 9408 + 4 x 9 x 32 = 10560 bytes, shared by 2 images
    two = scaling.roofline_batch(SMALL, slow_memory, batch=2, prompt_tokens=2)
    assert two["seconds_per_image"] == pytest.approx(10.560 / 2)
    # compute-bound: flops 3 x 6272 + (4 x 2 x 2 x 4 x 2 rows = 128) x (2 + 3 + 4) = 19968 at 1000 flop/s
    slow_compute = scaling.Card("made-up", bandwidth=1e15, flops=1000.0, memory_gb=1)
    flops = scaling.roofline_batch(SMALL, slow_compute, batch=1, prompt_tokens=2)
    assert flops["flops"] == 19968 and flops["seconds_per_image"] == pytest.approx(19.968)
    assert flops["memory_bound_steps"] == 0


def test_janus_pro_7b_shape_is_the_configs():
    from earkit.engine.tiny import janus_pro_config

    config = janus_pro_config("7b")
    text, vq = config.text_config, config.vq_config
    shape = scaling.JANUS_PRO_7B
    assert (shape.layers, shape.hidden, shape.heads, shape.kv_heads, shape.intermediate) == (
        text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.num_key_value_heads,
        text.intermediate_size)
    assert (shape.image_vocab, shape.image_embed, shape.aligner_layers, shape.image_tokens) == (
        vq.num_embeddings, vq.embed_dim, vq.num_hidden_layers, config.vision_config.num_image_tokens)
    assert shape.head_dim == text.head_dim
    # 30 x (4 x 4096^2 + 3 x 4096 x 11008) + (4096^2 + 4096 x 16384) + (8 x 4096 + 4096^2)
    assert shape.decode_parameters() == 6_171_951_104


def test_plan_rounds_up_to_whole_batches_per_rank():
    # 100 images a side in batches of 16: 7 batches (the last of 4 costs a full one)
    eight = scaling.plan_run(100, sides=2, gpus=8, batch=16, seconds_per_image=0.5, judge_seconds=0.01)
    assert eight["batches_per_side"] == 7 and eight["batches_per_rank"] == 2  # one a side
    assert eight["sampling_s"] == pytest.approx(2 * 16 * 0.5)
    assert eight["judging_s"] == pytest.approx(200 * 0.01) and eight["total_s"] == pytest.approx(18.0)
    three = scaling.plan_run(100, sides=2, gpus=3, batch=16, seconds_per_image=0.5, judge_seconds=0.01)
    assert three["batches_per_rank"] == 6 and three["sampling_s"] == pytest.approx(2 * 3 * 16 * 0.5)
    one = scaling.plan_run(100, sides=1, gpus=1, batch=16, seconds_per_image=0.5, judge_seconds=0.0)
    assert one["sampling_s"] == pytest.approx(7 * 16 * 0.5) and one["images"] == 100


def test_projection_alone_says_it_is_a_projection(capsys):
    bench_main(["scaling", "--skip-measure", "--efficiency", "0.25", "--judge-seconds", "0.02"])
    report = capsys.readouterr().out
    assert "PROJECTION" in report and "not a measurement" in report and "NOT measured" in report
    assert "Efficiency 0.25" in report and "0.02 s an image" in report
    assert report.count("| Six-CD nudity") == 6 and report.count("| COCO-30k") == 6  # 2 cards x 1, 8, 64 GPUs


@pytest.mark.parametrize("argv, name", [(["--seeds", "0"], "--seeds"), (["--ranks", "1", "x"], "--ranks"),
                                        (["--ranks", "2", "2"], "--ranks"), (["--efficiency", "0"], "--efficiency"),
                                        (["--efficiency", "1.5"], "--efficiency"),
                                        (["--judge-seconds", "nan"], "--judge-seconds"),
                                        (["--batch-size", "2.5"], "--batch-size")])
def test_bad_values_are_one_line(argv, name):
    with pytest.raises(SystemExit) as stopped:
        bench_main(["scaling", "--skip-measure", *argv])
    message = str(stopped.value.code)
    assert name in message and len(message.splitlines()) == 1


def test_quick_run_on_one_and_two_ranks(tmp_path):
    out = tmp_path / "results.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # from tmp_path, not the repository root (whose earkit/ would shadow the installed package)
    done = subprocess.run([sys.executable, "-m", "earkit.bench", "scaling", "--ranks", "1", "2", "--prompts", "2",
                           "--seeds", "1", "--batch-size", "2", "--out", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report = out.read_text()
    assert report.strip() in done.stdout
    rows = [line for line in report.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert len(rows) == 2 and all(row.split("|")[4].strip() == "8" for row in rows)  # 2 x (2 + 2) x 1 images
    assert "metrics.json: byte-identical across 1 and 2 ranks" in report
    assert "one thread per rank" in report and "ShapesWorld, this CPU" in report
