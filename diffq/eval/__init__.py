"""Evaluation: the shapes reference world, a tiny CLIP-like evaluator, metrics and grids."""
