"""The exceptions a user can cause.

Each carries one clear sentence: what, which file, why, what to do.

The CLI catches :class:`MiniGPT4Error` and prints its message on one line (exit code 2), so any
error raised with one of these classes reaches a student as a sentence, not a traceback.
"""


class MiniGPT4Error(Exception):
    """Base class of every error a user can cause (bad file, bad option, bad checkpoint)."""


class ImageLoadError(MiniGPT4Error, ValueError):
    """An image file could not be read or was refused (corrupt, too large, not an image...)."""


class CheckpointError(MiniGPT4Error, ValueError):
    """A checkpoint is missing, unsafe, truncated, or does not match the model (names tensors)."""


class DataError(MiniGPT4Error, ValueError):
    """A data file is malformed, an entry is broken, or a dataset is empty (names file, entry)."""


class ConfigError(MiniGPT4Error, ValueError):
    """A configuration or option is invalid, or the installed libraries cannot do what was asked."""


class TrainingError(MiniGPT4Error, RuntimeError):
    """Training had to stop (for example a NaN/inf loss); the message names the step."""
