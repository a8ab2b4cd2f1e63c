"""Sensitivity probes and bit allocation under a budget."""
from diffq.mixed.allocate import allocate
from diffq.mixed.plan import Allocation, choose, storage_bytes
from diffq.mixed.sensitivity import SensitivityTable, measure_allocation, measure_sensitivity, record_calls

__all__ = ["allocate", "Allocation", "choose", "storage_bytes", "SensitivityTable", "measure_allocation",
           "measure_sensitivity", "record_calls"]
