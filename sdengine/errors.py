"""The one exception hierarchy of sdengine: every message says what is wrong and what to do."""


class SDEngineError(Exception):
    """Base of every error sdengine raises on purpose."""


class InvalidInputError(SDEngineError, ValueError):
    """A parameter from the user is out of range or malformed."""


class ModelLoadError(SDEngineError):
    """A model folder or checkpoint cannot be read."""


class PickleCheckpointError(ModelLoadError):
    """A pickle checkpoint (.ckpt, .pt, .bin) was given: refused, it can run arbitrary code."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint is of a model family or feature sdengine does not implement."""


class WeightsMismatchError(ModelLoadError):
    """A strict load found missing, unexpected or mis-shaped tensors."""
