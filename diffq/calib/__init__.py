"""Calibration: activation collection across denoising steps and static scale derivation."""
