"""Reports: figures and one self-contained HTML page per model, from derivatives alone."""

from .group import build_group_report
from .html import build_report

__all__ = ["build_group_report", "build_report"]
