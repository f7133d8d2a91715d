"""Optional: EleutherAI lm-evaluation-harness tasks on a (masked) model.

Install with ``pip install 'llm2bids[lmeval]'``. Masking contexts apply, since the harness
calls the same model object::

    with mask_neurons(lm.model, neurons):
        scores = run_lm_eval(lm, ["hellaswag"])

Hub tasks (``"hellaswag"``) download their datasets. A local task, a dict config over local
JSON lines, runs offline (set ``HF_DATASETS_OFFLINE=1`` where there is no network)::

    task = {
        "task": "my_cloze",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": "items.jsonl"}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "metric_list": [{"metric": "acc"}],
    }
    scores = run_lm_eval(lm, [task])
"""

from __future__ import annotations

from .._docs import fill_doc
from ..exceptions import InputError
from ..models import LoadedModel


@fill_doc
def run_lm_eval(
    lm: LoadedModel, tasks: list[str | dict], limit: int | None = None, batch_size: int = 8
) -> dict:
    """Run ``lm_eval`` tasks on ``lm`` and return the harness's ``results`` dictionary.

    Parameters
    ----------
    %(lm)s
    tasks : list of str or dict
        lm-evaluation-harness task names, or task configs (dicts, e.g. over local files).
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
            "(hub tasks download their datasets; local tasks, dict configs over local files, "
            "run offline)."
        ) from err
    if not tasks:
        raise InputError("give at least one lm-eval task name, e.g. ['hellaswag'].")
    wrapped = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size=batch_size)
    return lm_eval.simple_evaluate(model=wrapped, tasks=list(tasks), limit=limit)["results"]
