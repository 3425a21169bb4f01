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


class BackendUnavailableError(SDEngineError):
    """A backend's library or hardware is absent here (TensorRT, cuda-python, an NVIDIA GPU)."""


class CudaError(SDEngineError):
    """A CUDA call failed: the message names the call and the CUDA error."""


class EngineMismatchError(ModelLoadError):
    """An engine set was built for another GPU, TensorRT version, graph or sdengine: rebuild it."""


class NonFiniteOutputError(SDEngineError):
    """A network produced NaN or infinity and no float32 retry could repair it."""


class LoraError(ModelLoadError):
    """A LoRA file cannot be read, is of a refused kind, or does not fit the model's weights."""
