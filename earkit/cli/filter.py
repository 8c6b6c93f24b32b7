"""`earkit filter`: keep the pairs whose images show the concept (ECGVF). For now a thin module over
earkit.ecgvf.filter, so that every command has the same add_arguments/run pair."""

from earkit.ecgvf.filter import add_filter_arguments as add_arguments, run_filter as run

__all__ = ["add_arguments", "run"]
