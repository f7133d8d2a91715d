"""Optional: EleutherAI lm-evaluation-harness tasks on a (masked) model.

For users whose machines can fetch the benchmarks' datasets; install with
``pip install 'llm2bids[lmeval]'``. Masking contexts apply, since the harness calls the same
model object::

    with mask_neurons(lm.model, neurons):
        scores = run_lm_eval(lm, ["hellaswag"])
"""

from __future__ import annotations

from .._docs import fill_doc
from ..exceptions import InputError
from ..models import LoadedModel


@fill_doc
def run_lm_eval(
    lm: LoadedModel, tasks: list[str], limit: int | None = None, batch_size: int = 8
) -> dict:
    """Run ``lm_eval`` tasks on ``lm`` and return the harness's ``results`` dictionary.

    Parameters
    ----------
    %(lm)s
    tasks : list of str
        lm-evaluation-harness task names.
    limit : int or None, default=None
        At most this many examples per task.
    batch_size : int, default=8
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as err:
        raise InputError(
            "lm-eval is not installed; install it with `pip install 'llm2bids[lmeval]'` "
            "(its tasks download datasets, so the machine needs access to the hub)."
        ) from err
    if not tasks:
        raise InputError("give at least one lm-eval task name, e.g. ['hellaswag'].")
    wrapped = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=batch_size)
    return lm_eval.simple_evaluate(model=wrapped, tasks=list(tasks), limit=limit)["results"]
