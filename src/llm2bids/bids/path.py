"""One object for every BIDS file name llm2bids writes or reads, after MNE-BIDS's ``BIDSPath``.

Every module builds and finds its files through :class:`BIDSPath`; no name is put together or
taken apart by string handling anywhere else, so renaming a derivative is a change in one place
and a reader that looks for it by its entities still finds it.

Examples
--------
>>> p = BIDSPath(root="ds", subject="smollm2", task="narrative", acquisition="mlp", run=2,
...              suffix="bold", extension=".nii")
>>> p.basename
'sub-smollm2_task-narrative_acq-mlp_run-02_bold.nii'
>>> p.update(suffix="events", extension=".tsv").basename
'sub-smollm2_task-narrative_acq-mlp_run-02_events.tsv'
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

from ..exceptions import DatasetError, InputError

#: (attribute, BIDS key) of each entity, in the order names list them.
ENTITIES = (
    ("subject", "sub"),
    ("session", "ses"),
    ("task", "task"),
    ("acquisition", "acq"),
    ("run", "run"),
    ("atlas", "atlas"),
    ("description", "desc"),
    ("contrast", "contrast"),
    ("stat", "stat"),
)
_ATTRIBUTE = {key: attr for attr, key in ENTITIES}
_LABEL = re.compile(r"[a-zA-Z0-9]+")


@dataclasses.dataclass(frozen=True)
class BIDSPath:
    """A BIDS file: its entities, suffix and extension, and where it lives.

    Parameters
    ----------
    subject, session, task, acquisition, atlas, description, contrast, stat : str or None
        Entity labels (letters and digits); ``None`` leaves the entity out. ``acquisition``
        is the hook point (``mlp`` or ``resid``).
    run : int or None
        Run index, written with two digits (``run-02``).
    suffix : str or None
        ``bold``, ``events``, ``components``, ... (``None`` in a query matches any).
    extension : str or None
        With its dot: ``.nii``, ``.nii.gz``, ``.tsv``, ``.json`` (``None`` matches any).
    datatype : str, default="func"
        The folder inside the subject's folder.
    root : path-like or None
        The dataset (or derivatives) folder.
    """

    subject: str | None = None
    session: str | None = None
    task: str | None = None
    acquisition: str | None = None
    run: int | None = None
    atlas: str | None = None
    description: str | None = None
    contrast: str | None = None
    stat: str | None = None
    suffix: str | None = None
    extension: str | None = None
    datatype: str = "func"
    root: Path | None = None

    def __post_init__(self):
        for attr, key in ENTITIES:
            value = getattr(self, attr)
            if value is None:
                continue
            if attr == "run":
                if isinstance(value, bool) or int(value) != value or int(value) < 0:
                    raise InputError(f"run must be a non-negative integer, got {value!r}.")
                object.__setattr__(self, "run", int(value))
            elif not isinstance(value, str) or not _LABEL.fullmatch(value):
                raise InputError(
                    f"{attr} ({key}) label must be letters and digits only ([a-zA-Z0-9]+), "
                    f"got {value!r}."
                )
        if self.root is not None:
            object.__setattr__(self, "root", Path(self.root))

    # -- names -----------------------------------------------------------------------------
    @property
    def entities(self) -> dict[str, str | int]:
        """The entities that are set, by BIDS key, in name order."""
        values = ((key, getattr(self, attr)) for attr, key in ENTITIES)
        return {key: value for key, value in values if value is not None}

    @property
    def basename(self) -> str:
        """The file name: ``sub-X_..._<suffix><extension>``."""
        if self.suffix is None:
            raise InputError("a file name needs a suffix (bold, events, ...).")
        parts = [
            f"{key}-{value:02d}" if key == "run" else f"{key}-{value}"
            for key, value in self.entities.items()
        ]
        return "_".join([*parts, self.suffix]) + (self.extension or "")

    @property
    def directory(self) -> Path:
        """``root/sub-X[/ses-Y]/<datatype>``, or ``root`` for a file without a subject."""
        root = self._require_root()
        if self.subject is None:
            return root
        folder = root / participant_id(self.subject)
        if self.session is not None:
            folder = folder / f"ses-{self.session}"
        return folder / self.datatype

    @property
    def fpath(self) -> Path:
        """The full path of the file."""
        return self.directory / self.basename

    def __fspath__(self) -> str:
        return os.fspath(self.fpath)

    def __str__(self) -> str:
        return os.fspath(self.fpath) if self.root is not None else self.basename

    def update(self, **changes) -> BIDSPath:
        """A copy with some fields changed (``None`` removes an entity)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise InputError(
                f"BIDSPath has no field(s) {sorted(unknown)}; fields are "
                f"{[f.name for f in dataclasses.fields(self)]}."
            )
        return dataclasses.replace(self, **changes)

    # -- reading names back ----------------------------------------------------------------
    @classmethod
    def from_path(cls, path: str | os.PathLike, root: str | os.PathLike | None = None) -> BIDSPath:
        """Parse a file's name (and its datatype folder) back into a :class:`BIDSPath`."""
        path = Path(path)
        name = path.name
        stem, dot, ext = name.partition(".")
        *pairs, suffix = stem.split("_")
        fields: dict = {}
        for pair in pairs:
            key, sep, value = pair.partition("-")
            if not sep or key not in _ATTRIBUTE:
                raise DatasetError(
                    f"{name} is not a BIDS name llm2bids knows: entity {pair!r} (known: "
                    f"{', '.join(_ATTRIBUTE)})."
                )
            fields[_ATTRIBUTE[key]] = int(value) if key == "run" else value
        if "subject" in fields and not path.parent.name.startswith(("sub-", "ses-")):
            fields["datatype"] = path.parent.name or "func"
        return cls(**fields, suffix=suffix, extension=dot + ext if dot else "", root=root)

    def matches(self, other: BIDSPath) -> bool:
        """Whether ``other`` has every entity, suffix and extension that this path sets."""
        mine = self.entities
        if any(other.entities.get(key) != value for key, value in mine.items()):
            return False
        if self.suffix is not None and other.suffix != self.suffix:
            return False
        return self.extension is None or other.extension == self.extension

    def match_dataset_level(self, root: str | os.PathLike | None = None) -> list[BIDSPath]:
        """The files at the top of ``root`` (no subject: group-level derivatives) whose names
        have this path's entities, sorted by name.

        Parameters
        ----------
        root : path-like or None, default=None
            The dataset; ``None`` takes this path's root.
        """
        root = Path(root) if root is not None else self._require_root()
        found = []
        for path in sorted(root.iterdir()):
            if path.name.startswith(".") or not path.is_file():
                continue
            try:
                candidate = BIDSPath.from_path(path, root=root)
            except DatasetError:
                continue
            if candidate.subject is None and self.matches(candidate):
                found.append(candidate)
        return found

    def match(self, root: str | os.PathLike | None = None) -> list[BIDSPath]:
        """The files under ``root`` whose names have this path's entities (a query).

        Fields left ``None`` match anything; hidden files (temporaries) never match. Files
        whose names llm2bids cannot parse are skipped.

        Returns
        -------
        list of BIDSPath
            Sorted by path (subject, session, then file name).
        """
        root = Path(root) if root is not None else self._require_root()
        query = self.update(root=root)
        sub, ses = self.subject or "*", self.session or "*"
        patterns = [f"sub-{sub}/ses-{ses}/{self.datatype}"]
        if self.session is None:
            patterns.append(f"sub-{sub}/{self.datatype}")
        folders = sorted({folder for pattern in patterns for folder in root.glob(pattern)})
        found = []
        for folder in folders:
            if not folder.is_dir():
                continue
            for path in sorted(folder.iterdir()):
                if path.name.startswith(".") or not path.is_file():
                    continue
                try:
                    candidate = BIDSPath.from_path(path, root=root)
                except (DatasetError, InputError, ValueError):
                    continue
                if candidate.fpath == path and query.matches(candidate):
                    found.append(candidate)
        return sorted(found, key=lambda p: p.fpath)

    def sidecars(self) -> list[BIDSPath]:
        """The JSON sidecars that apply to this file by the inheritance principle.

        Most general first: the dataset level (``task-<label>_<suffix>.json`` at the root),
        the recording level (the name without its run), the file's own; metadata read in this
        order, later values winning, is the file's.
        """
        own = self.update(extension=".json")
        chain = []
        if self.subject is not None and self.task is not None:
            chain.append(
                BIDSPath(task=self.task, suffix=self.suffix, extension=".json", root=self.root)
            )
        if self.run is not None:
            chain.append(own.update(run=None))
        return [*chain, own]

    def sidecar(self) -> BIDSPath:
        """The most specific of :meth:`sidecars` that exists; the file's own name without one."""
        if self.root is not None:
            for candidate in reversed(self.sidecars()):
                if candidate.fpath.exists():
                    return candidate
        return self.update(extension=".json")

    def _require_root(self) -> Path:
        if self.root is None:
            raise InputError("this BIDSPath has no root; pass root= (the dataset folder).")
        return self.root


def by_role(paths) -> dict[str, list[Path]]:
    """Group written files by their role, the BIDS suffix (``components``, ``keyneurons``, ...).

    Sidecars (``.json``) are left out: each belongs to the file of the same name.
    """
    roles: dict[str, list[Path]] = {}
    for path in paths:
        path = Path(path)
        if not path.name.endswith(".json"):
            roles.setdefault(suffix_of(path), []).append(path)
    return roles


def suffix_of(path: str | os.PathLike) -> str:
    """The suffix of a BIDS-like file name (``..._dseg.nii.gz`` -> ``dseg``), entities unchecked.

    For files a user names: unlike :meth:`BIDSPath.from_path`, unknown entities are allowed.
    """
    return Path(path).name.partition(".")[0].rpartition("_")[2]


def participant_id(subject: str) -> str:
    """``sub-<subject>``: the subject's row label in ``participants.tsv``."""
    return f"sub-{BIDSPath(subject=subject).subject}"


def subjects(root: str | os.PathLike) -> list[str]:
    """Labels of the subjects that have a folder in ``root``, sorted."""
    return sorted(
        p.name[len("sub-") :]
        for p in Path(root).glob("sub-*")
        if p.is_dir() and _LABEL.fullmatch(p.name[4:])
    )


def report_path(root: str | os.PathLike, subject: str) -> Path:
    """``root/sub-<subject>.html``: a subject's report, beside its folder (as fMRIPrep's)."""
    return Path(root) / f"{participant_id(subject)}.html"


def figures_dir(root: str | os.PathLike, subject: str) -> Path:
    """``root/figures/sub-<subject>``: where a subject's report figures go."""
    return Path(root) / "figures" / participant_id(subject)


def pruned_dir(root: str | os.PathLike, subject: str) -> Path:
    """``root/pruned/sub-<subject>``: where a derivatives folder keeps a pruned model."""
    return Path(root) / "pruned" / participant_id(subject)


def sessions_path(root: str | os.PathLike, subject: str) -> Path:
    """``root/sub-<subject>/sub-<subject>_sessions.tsv``: the revisions recorded for a model."""
    sub = participant_id(subject)
    return Path(root) / sub / f"{sub}_sessions.tsv"
