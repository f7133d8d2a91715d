"""The table of sub-commands, filled by :mod:`.commands` when it is imported.

It lives in its own module so that every way of starting the CLI (the console script,
``python -m llm2bids``, ``python -m llm2bids.cli.main``) sees the same table: a registry kept
in ``main`` would be a different module object when ``main`` runs as ``__main__``.
"""

from __future__ import annotations

COMMANDS: dict = {}


def command(name: str, help: str, add_arguments):
    """Register ``fn(args)`` as sub-command ``name``; ``add_arguments(parser)`` declares its flags."""

    def wrap(fn):
        COMMANDS[name] = (fn, help, add_arguments)
        return fn

    return wrap
