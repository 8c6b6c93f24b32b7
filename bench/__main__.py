"""python -m earkit.bench SUBCOMMAND: earkit's benchmarks.

    python -m earkit.bench kernels [--n 2304 --v 16384 --dtypes fp32,bf16 --repeats 10 --threads 2 --out FILE]
    python -m earkit.bench kernels --quick
    python -m earkit.bench kernels --linear-only --full-shapes --plot linear.png --out bench/RESULTS.md

Subcommands: `kernels` (the loss ops on CPU against the torch eager chain, bench/loss_ops.py, then
the fused linear + loss ops against torch eager, torch.compile, Liger and cut-cross-entropy,
bench/linear.py),
`engine` (sampler and erasure step at the Janus-Pro shapes with random weights, bench/engine.py),
`load` (`earkit erase` idle and beside CPU-bound neighbours, bench/load.py),
`scaling` (`earkit eval` on 1 and 2 torchrun ranks, and the paper-scale runs projected, bench/scaling.py),
`robustness` (the ShapesWorld default erasure and --robust under the three attacks, bench/robustness.py),
`adapters` (LoRA ranks 4 and 16 against full self_attn training; two adapters stacked against one
run erasing both, bench/lora_adapters.py).
The GPU check is its own script: python -m earkit.bench.gpu_check (bench/gpu_check.py).
"""

import argparse
import os


def add_kernels_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=2304, help="tokens (rows of logits); 2304 = 4 images of 576")
    parser.add_argument("--v", type=int, default=16384, help="vocabulary (Janus-Pro's VQ codebook)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16")
    parser.add_argument("--repeats", type=int, default=10, help="timed fwd+bwd runs per row (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before timing")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch and the native twin (0: default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny shape (N=64, V=512), 2 repeats: a smoke test")
    parser.add_argument("--out", default=None, help="append the markdown report (with date and CPU) to this file")
    # The fused linear + loss part (bench/linear.py).
    parser.add_argument("--full-shapes", action="store_true",
                        help="linear ops: N = 1152, 2304, 9216 x H = 2048, 4096 x V = 16384 (default on a GPU; "
                             "on a CPU small shapes unless given)")
    parser.add_argument("--linear-dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--no-compile", action="store_true", help="linear ops: leave out the torch.compile rows")
    parser.add_argument("--no-linear", action="store_true", help="only the logits-level table")
    parser.add_argument("--linear-only", action="store_true", help="only the fused linear + loss table")
    parser.add_argument("--plot", default=None, help="linear ops: save a time / memory plot here (matplotlib)")


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", choices=["tiny", "1b", "7b"], default="7b", help="Janus-Pro shape (tiny: a CPU smoke run)")
    parser.add_argument("--random-weights", action="store_true", help="build the model with random weights (required)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp32")
    parser.add_argument("--sampler-batches", type=int, nargs="+", default=[1, 16], help="prompts per sampler batch")
    parser.add_argument("--train-batch", type=int, default=8, help="prompt pairs per erasure step")
    parser.add_argument("--window", type=int, default=48)
    parser.add_argument("--optimizer", default="adamw8bit", choices=["adamw8bit", "paged-adamw8bit", "adamw"])
    parser.add_argument("--no-gradient-checkpointing", action="store_true")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=None, help="append the markdown report to this file")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m earkit.bench", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    add_kernels_arguments(commands.add_parser("kernels", help="loss ops on CPU: earkit vs torch eager"))
    add_engine_arguments(commands.add_parser("engine", help="sampler and erasure step, Janus-Pro shapes, random weights"))
    from . import load

    load.add_arguments(commands.add_parser("load", help="earkit erase idle and beside CPU-bound neighbours"))
    from . import scaling

    scaling.add_arguments(commands.add_parser("scaling", help="earkit eval on 1 and 2 ranks; paper-scale projection"))
    from . import robustness

    robustness.add_arguments(commands.add_parser("robustness", help="the default erasure and --robust under attack"))
    from . import lora_adapters as adapters

    adapters.add_arguments(commands.add_parser("adapters", help="LoRA adapters against full training; stacking"))
    args = parser.parse_args(argv)

    if getattr(args, "threads", 0):
        # Before torch (and the native twin's OpenMP runtime) load, so both use this many threads.
        os.environ["OMP_NUM_THREADS"] = str(args.threads)

    if args.command == "kernels":
        from . import loss_ops

        loss_ops.main(args)
    elif args.command == "engine":
        from . import engine

        engine.main(args)
    elif args.command == "load":
        load.main(args)
    elif args.command == "scaling":
        status = scaling.main(args)
        if status:
            raise SystemExit(status)
    elif args.command == "robustness":
        robustness.main(args)
    elif args.command == "adapters":
        adapters.main(args)


if __name__ == "__main__":
    main()
