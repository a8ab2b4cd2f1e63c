"""The `diffq` commands (calibrate, eval, compare, bench): settings dataclasses and the runs that
drive pipelines, write outputs and reports. `diffq.cli` parses the command line into them."""
