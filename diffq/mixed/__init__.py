"""Sensitivity probes and bit allocation under a budget."""
