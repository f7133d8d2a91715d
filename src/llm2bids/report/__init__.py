"""Reports: figures and one self-contained HTML page per model, from derivatives alone."""

from .html import build_report

__all__ = ["build_report"]
