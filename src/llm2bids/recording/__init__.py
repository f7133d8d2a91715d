"""Recording: forward passes with hooks, streamed to BIDS run by run."""

from .recorder import record

__all__ = ["record"]
