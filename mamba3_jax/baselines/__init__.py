"""Baseline mixers from the paper's comparisons, built on the same SSM core."""
