"""Running the official BIDS validator (``bids-validator-deno``)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..exceptions import ValidatorError

logger = logging.getLogger("llm2bids.bids")


@dataclass
class ValidationResult:
    """What the validator said.

    Attributes
    ----------
    errors, warnings : list of dict
        Issues as the validator reports them (``code``, ``location``, ``issueMessage``...).
    returncode : int
        The validator's exit code.
    n_files_checked : int
        Files the validator read (those that ``.bidsignore`` hides are not counted).
    """

    errors: list[dict] = field(default_factory=list)
    warnings: list[dict] = field(default_factory=list)
    returncode: int = 0
    n_files_checked: int = 0

    @property
    def valid(self) -> bool:
        """True when there is no error."""
        return not self.errors and self.returncode == 0

    def summary(self) -> str:
        """Human-readable list of the issues."""
        lines = [f"{len(self.errors)} error(s), {len(self.warnings)} warning(s)"]
        for level, issues in (("ERROR", self.errors), ("WARNING", self.warnings)):
            for issue in issues:
                where = issue.get("location", "")
                msg = issue.get("issueMessage") or issue.get("subCode") or ""
                lines.append(f"  {level} {issue.get('code')}: {where} {msg}".rstrip())
        return "\n".join(lines)


def validator_executable() -> str:
    """Path of the ``bids-validator-deno`` executable (installed with llm2bids)."""
    candidates = [Path(sys.executable).parent / "bids-validator-deno"]
    found = shutil.which("bids-validator-deno")
    if found:
        candidates.append(Path(found))
    for path in candidates:
        if path.exists():
            return str(path)
    raise ValidatorError(
        "bids-validator-deno is not installed; install it with `pip install bids-validator-deno`."
    )


def config_path() -> Path:
    """The shipped validator config, which ignores checks that cannot apply to a model."""
    return Path(str(resources.files("llm2bids.bids").joinpath("validator_config.json")))


def validate(root: str | Path, recursive: bool = False, timeout: float = 600) -> ValidationResult:
    """Validate a dataset with the official BIDS validator.

    Parameters
    ----------
    root : str or Path
        A raw dataset, or a derivatives folder (a dataset of its own).
    recursive : bool, default=False
        Also validate the datasets under ``derivatives/``.
    timeout : float, default=600
        Seconds after which the validator is stopped (an error says so).

    Returns
    -------
    ValidationResult
    """
    if not Path(root).is_dir():
        from ..exceptions import DatasetError

        raise DatasetError(f"{str(root)!r} is not a folder; pass the dataset to validate.")
    cmd = [validator_executable(), "--format", "json", "--config", str(config_path())]
    if recursive:
        cmd.append("--recursive")
    cmd.append(str(root))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ValidatorError(f"could not run the BIDS validator: {err}") from err
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError as err:
        raise ValidatorError(
            f"the BIDS validator exited {proc.returncode} without a JSON report: "
            f"{(proc.stderr or proc.stdout)[-2000:]}"
        ) from err
    issues = report.get("issues", {}).get("issues", [])
    result = ValidationResult(
        errors=[i for i in issues if i.get("severity") == "error"],
        warnings=[i for i in issues if i.get("severity") == "warning"],
        returncode=proc.returncode,
        n_files_checked=int(report.get("summary", {}).get("totalFiles", 0)),
    )
    logger.info("validator on %s: %s", root, result.summary().splitlines()[0])
    return result
