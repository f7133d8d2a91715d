"""Exceptions raised by llm2bids.

Every error a user can trigger derives from :class:`Llm2BidsError`, names what was wrong,
what was allowed, and what to do about it.
"""

from __future__ import annotations


class Llm2BidsError(Exception):
    """Base class of every llm2bids error."""


class InputError(Llm2BidsError, ValueError):
    """A parameter or an input file is not what the function needs."""


class ModelLoadError(Llm2BidsError):
    """A model could not be found or loaded."""


class UnsupportedArchitectureError(Llm2BidsError):
    """The model's architecture is not in the hook-point registry."""


class StimuliError(InputError):
    """A stimulus file or folder is empty, unreadable or badly formed."""


class DatasetError(Llm2BidsError):
    """A BIDS dataset (or derivatives folder) is missing, corrupt or inconsistent."""


class ParameterClashError(Llm2BidsError):
    """Existing outputs were made with other parameters; pass ``overwrite=True`` to replace them."""


class DiskSpaceError(Llm2BidsError, OSError):
    """The target disk has too little room for what is about to be written."""


class NumericalError(Llm2BidsError):
    """Activations or results contain NaN or Inf."""


class ValidatorError(Llm2BidsError):
    """The BIDS validator could not be run."""


class ResourceError(InputError):
    """The work asked for does not fit this machine's memory; smaller parameters would."""
