"""earkit.ecgvf: the ECGVF benchmark (not built yet)."""
