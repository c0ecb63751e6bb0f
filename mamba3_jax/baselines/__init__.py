"""Baseline mixers from the paper's comparisons: Mamba-2 (on the same SSM core), attention
(Transformer++ and hybrid layers) and Gated DeltaNet."""
