"""Exceptions raised by llm2bids.

Every error a user can trigger derives from :class:`Llm2BidsError`, names what was wrong,
what was allowed, and what to do about it.
"""

from __future__ import annotations

import errno


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


def check_choice(name: str, value, allowed) -> None:
    """Refuse ``value`` for parameter ``name`` unless it is one of ``allowed``.

    Parameters
    ----------
    name : str
        The parameter's name, as the caller's signature spells it; the command line adds
        its flag (see :mod:`llm2bids.cli`).
    value : object
        What was given.
    allowed : sequence
        The allowed values.

    Raises
    ------
    InputError
        Naming the parameter, what is allowed and what was given.
    """
    allowed = tuple(allowed)
    if value not in allowed:
        raise InputError(f"{name} must be one of {allowed}, got {value!r}.")


def check_positive_int(name: str, value, allow_none: bool = False) -> None:
    """Refuse anything but an integer of at least 1 (``bool`` is not one).

    Parameters
    ----------
    name : str
        The parameter's name, as the caller's signature spells it.
    value : object
        What was given.
    allow_none : bool, default=False
        Also accept ``None`` (a parameter whose ``None`` means a default).

    Raises
    ------
    InputError
        Naming the parameter and what was given.
    """
    import numbers

    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        accepted = "a positive integer" + (" or None" if allow_none else "")
        raise InputError(f"{name} must be {accepted}, got {value!r}.")


#: What to do about the operating-system errors a user can cause, by errno.
_OS_ADVICE = {
    errno.EROFS: "the file system is read-only: pass a writable folder (or copy the dataset to one)",
    errno.EACCES: "permission denied: pass a folder you can write, or change its permissions",
    errno.EPERM: "operation not permitted: pass a folder you can write",
    errno.ENOSPC: "the disk is full: free some space (or write elsewhere) and run the command again",
    errno.EDQUOT: "the disk quota is exceeded: free some space and run the command again",
    errno.EISDIR: "this is a folder where a file was expected: pass a file",
    errno.ENOTDIR: "part of this path is a file where a folder was expected",
    errno.ENAMETOOLONG: "the name is too long for the file system: use a shorter path",
}


def os_error_text(err: OSError) -> str | None:
    """One line saying which file an OS error concerns and what to do; ``None`` if unknown.

    Parameters
    ----------
    err : OSError
        Raised while reading or writing a dataset, an output folder or an input file.

    Returns
    -------
    str or None
        ``None`` for errors that are not the user's to fix (a bug, shown with its traceback).
    """
    advice = _OS_ADVICE.get(err.errno)
    if advice is None:
        return None
    where = f" ({err.filename})" if err.filename else ""
    return f"{err.strerror or 'error'}{where}; {advice}. Files written before are unchanged."
