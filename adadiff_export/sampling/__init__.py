"""Sampling: the samplers, the reference early exit (the oracle), batched generation and image grids."""
