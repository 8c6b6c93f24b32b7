"""`earkit pairs`: generate concept/anchor prompt pairs (ECGVF). For now a thin module over
earkit.ecgvf.pair_generation, so that every command has the same add_arguments/run pair."""

from earkit.ecgvf.pair_generation import add_pairs_arguments as add_arguments, run_pairs as run

__all__ = ["add_arguments", "run"]
