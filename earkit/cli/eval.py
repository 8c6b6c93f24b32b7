"""`earkit eval`: measure an erasure before and after, with a report (ECGVF). For now a thin module
over earkit.ecgvf.evaluate, so that every command has the same add_arguments/run pair."""

from earkit.ecgvf.evaluate import add_eval_arguments as add_arguments, run_eval as run

__all__ = ["add_arguments", "run"]
