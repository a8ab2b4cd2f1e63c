"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class DiffqError(Exception):
    """Base class for errors caused by user input (recipes, paths, data), not by bugs."""


class RecipeError(DiffqError):
    """A recipe is unknown, malformed, or asks for something the model does not have."""


class CheckpointError(DiffqError):
    """A checkpoint directory is missing, corrupt, from a newer format, or for another model."""


class CalibrationError(DiffqError):
    """Calibration data is missing or produced non-finite activations."""


class InputError(DiffqError):
    """A path, prompt file or option value is unusable."""


class QuantizedWeightError(DiffqError):
    """Something asked a quantized layer for float weight values it does not hold (e.g. merging
    a LoRA adapter into it)."""
