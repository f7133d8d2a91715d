"""``llm2bids`` command line: parse arguments, call the public functions, report errors.

Analysis stages follow the BIDS-Apps convention (``BIDS_DIR OUTPUT_DIR participant``);
``record`` is a converter and takes only the dataset to write.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .._version import __version__
from ..exceptions import Llm2BidsError, os_error_text
from .registry import COMMANDS

logger = logging.getLogger("llm2bids")


class _Formatter(argparse.HelpFormatter):
    """Every option with a default says it (the library's default; see ``commands.default``).

    Unlike ``ArgumentDefaultsHelpFormatter``: options without help text show theirs too, and
    required options, flags and ``None`` defaults show none.
    """

    def __init__(self, prog):
        super().__init__(prog, max_help_position=32)

    def _get_help_string(self, action):
        text = action.help or ""
        shows = (
            action.option_strings
            and not action.required
            and action.default is not None
            and action.default is not argparse.SUPPRESS
            and not isinstance(action.default, bool)
            and "%(default)" not in text
        )
        return f"{text} (default: %(default)s)".strip() if shows else text

    def _format_action(self, action):
        if not action.help and action.help is not argparse.SUPPRESS:
            action.help = None
            if self._get_help_string(action):  # nothing to say but the default
                action.help = "(default: %(default)s)"
        return super()._format_action(action)


def _formatter(prog):
    return _Formatter(prog)


def add_bids_app_arguments(
    parser: argparse.ArgumentParser, levels: tuple[str, ...] = ("participant",)
) -> None:
    """The BIDS-Apps positionals and participant filter.

    Parameters
    ----------
    parser : argparse.ArgumentParser
    levels : tuple of str, default=("participant",)
        The analysis levels the command has (``group``: across subjects and sessions).
    """
    parser.add_argument("bids_dir", type=Path, help="the raw dataset written by `llm2bids record`")
    parser.add_argument("output_dir", type=Path, help="where the derivatives go")
    parser.add_argument(
        "analysis_level",
        choices=list(levels),
        help="participant: each model on its own"
        + ("; group: models compared (every subject and session)" if "group" in levels else ""),
    )
    parser.add_argument(
        "--participant-label",
        nargs="+",
        default=None,
        metavar="LABEL",
        help="subjects (models) to analyse, with or without 'sub-'; default all",
    )


def build_parser() -> argparse.ArgumentParser:
    """The full parser with every sub-command."""
    from llm2bids.cli import commands  # noqa: F401  (fills the registry)

    parser = argparse.ArgumentParser(
        prog="llm2bids",
        description="Neuroimaging for language models: record LLM neurons as BIDS fMRI data, "
        "find functional networks with nilearn, and lesion them.",
        formatter_class=_formatter,
    )
    parser.add_argument("--version", action="version", version=f"llm2bids {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=1, help="more messages")
    parser.add_argument("-q", "--quiet", action="store_true", help="only errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (fn, help_text, add_arguments) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_formatter)
        add_arguments(p)
        p.set_defaults(func=fn)
    return parser


def _with_flag(parser: argparse.ArgumentParser, args, message: str) -> str:
    """Errors name the library's parameter (``n_controls must ...``); add the flag that sets it."""
    name = message.split(" ", 1)[0]
    commands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    sub = commands[0].choices.get(args.command) if commands else None
    for action in sub._actions if sub is not None else []:
        if (
            action.dest == name
            and action.option_strings
            and f"({action.option_strings[0]}" not in message
        ):
            return f"{name} ({action.option_strings[0]}){message[len(name) :]}"
    return message


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``llm2bids`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = 0 if args.quiet else args.verbose
    logging.basicConfig(
        level=logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG,
        format="%(levelname)s %(name)s: %(message)s",
    )
    args.verbose = verbose
    if verbose == 0:  # quiet means quiet: no loading bars from transformers either
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        return int(args.func(args) or 0)
    except Llm2BidsError as err:
        print(
            f"llm2bids {args.command}: error: {_with_flag(parser, args, str(err))}", file=sys.stderr
        )
        return 2
    except OSError as err:  # a read-only folder, a full disk: the user's to fix, in one line
        text = os_error_text(err)
        if text is None:
            raise
        print(f"llm2bids {args.command}: error: {text}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"llm2bids {args.command}: interrupted; finished runs are kept, rerun to resume.",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
