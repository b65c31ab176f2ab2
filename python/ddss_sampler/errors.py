"""The error this package raises for a file or a model that does not fit."""


class SamplerFileError(ValueError):
    """A ``sampler.json`` (or a scheduler config holding one) that cannot be used, or a model or
    tensor that does not fit it. The message names the file, key or shape at fault."""
