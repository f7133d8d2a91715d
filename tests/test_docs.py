"""Every public function documents its parameters (numpydoc ``Parameters`` sections)."""

import importlib
import inspect
import pkgutil
import re

import pytest

import llm2bids
from llm2bids._docs import docdict, fill_doc


def _public_callables():
    for info in pkgutil.walk_packages(llm2bids.__path__, "llm2bids."):
        if info.name.endswith("__main__") or ".cli" in info.name:
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(obj):
                yield f"{module.__name__}.{name}", obj, obj.__doc__
            elif inspect.isclass(obj):
                if "__init__" in vars(obj) or "__dataclass_fields__" in vars(obj):
                    yield f"{module.__name__}.{name}", obj, obj.__doc__
                for attr, member in vars(obj).items():
                    if inspect.isfunction(member) and not attr.startswith("_"):
                        yield f"{module.__name__}.{name}.{attr}", member, member.__doc__


def _documented_names(doc: str) -> set[str]:
    """Names in the docstring's Parameters (or, for a data class, Attributes) section."""
    lines = inspect.cleandoc(doc or "").splitlines()
    names: set[str] = set()
    for title in ("Parameters", "Attributes"):
        for i, line in enumerate(lines[:-1]):
            if line.strip() != title or not set(lines[i + 1].strip()) == {"-"}:
                continue
            for entry in lines[i + 2 :]:
                if entry.strip() and set(entry.strip()) == {"-"}:
                    break  # the next section's underline: its title was read as a name
                if entry and not entry.startswith(" "):
                    head = entry.split(" : ")[0]
                    names |= {n.strip().lstrip("*") for n in head.split(",")}
    return names


def _exported() -> set[str]:
    """Qualified names of what the packages export (``__all__``) and their methods."""
    names = set()
    for info in pkgutil.walk_packages(llm2bids.__path__, "llm2bids."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name, None)
            if hasattr(obj, "__qualname__") and hasattr(obj, "__module__"):
                names.add(f"{obj.__module__}.{obj.__qualname__}")
    return names


def _undocumented():
    """Parameters missing from the docs: every exported callable's and method's, and those
    of other public functions with three parameters or more."""
    exported = _exported()
    missing = []
    for qualname, obj, doc in _public_callables():
        try:
            params = [
                p.name
                for p in inspect.signature(obj).parameters.values()
                if p.name not in ("self", "cls") and not p.name.startswith("_")
            ]
        except (TypeError, ValueError):
            continue
        owner = qualname.rsplit(".", 1)[0]
        if len(params) < 3 and qualname not in exported and owner not in exported:
            continue
        lacking = [p for p in params if p not in _documented_names(doc)]
        if lacking:
            missing.append(f"{qualname}: {', '.join(lacking)}")
    return missing


def test_public_functions_document_their_parameters():
    missing = _undocumented()
    assert not missing, "undocumented parameters:\n" + "\n".join(missing)


def test_fill_doc_indents_shared_text():
    @fill_doc
    def f(bids_dir, seed):
        """Do it.

        Parameters
        ----------
        %(bids_dir)s
        %(seed)s
        """

    assert "bids_dir : str or Path\n    The raw dataset" in inspect.cleandoc(f.__doc__)
    assert _documented_names(f.__doc__) == {"bids_dir", "seed"}
    with pytest.raises(KeyError, match="no shared documentation"):

        @fill_doc
        def g(x):
            """%(nope)s"""


def test_docdict_entries_are_numpydoc_shaped():
    for name, text in docdict.items():
        first, *rest = text.splitlines()
        assert re.match(r"[\w, ]+ : \S", first) and name.split("_")[0] in first, name
        assert rest and all(line.startswith("    ") for line in rest), name


def test_docstring_examples_run():
    """Every ``>>>`` example in the package's docstrings gives the output it shows."""
    import doctest
    import importlib
    import pkgutil

    import llm2bids

    ran = failed = 0
    for info in pkgutil.walk_packages(llm2bids.__path__, "llm2bids."):
        if info.name.endswith("__main__"):  # importing it runs the command line
            continue
        module = importlib.import_module(info.name)
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
        ran, failed = ran + result.attempted, failed + result.failed
    assert failed == 0
    assert ran >= 6  # the examples exist (BIDSPath, labels, membership rule)


def _documented_defaults(doc: str):
    """``(name, default text)`` of every ``name : type, default=X`` line (several names on
    one line may share a tuple of defaults, one each)."""
    for line in inspect.cleandoc(doc or "").splitlines():
        found = re.match(r"^([\w, *]+) : .*default=(.+)$", line)
        if found:
            names = [n.strip().lstrip("*") for n in found.group(1).split(",")]
            yield names, found.group(2).strip()


def test_documented_defaults_are_the_signatures():
    """Every ``default=`` a docstring states is the value in the signature (a literal, or the
    name of the object it is); the docs cannot drift from the code."""
    import ast

    wrong = []
    for qualname, obj, doc in _public_callables():
        try:
            parameters = inspect.signature(obj).parameters
        except (TypeError, ValueError):
            continue
        for names, text in _documented_defaults(doc):
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # a name: the default's own name
            for i, name in enumerate(names):
                if name not in parameters or parameters[name].default is inspect.Parameter.empty:
                    continue
                actual = parameters[name].default
                expected = value[i] if isinstance(value, tuple) and len(names) > 1 else value
                own_name = getattr(actual, "__name__", None)
                if isinstance(expected, str) and expected.rpartition(".")[2] == own_name:
                    continue  # the default's name (numpy.float32, mask_neurons)
                module = inspect.getmodule(obj)
                if isinstance(expected, str) and getattr(module, expected, None) is actual:
                    continue  # a module constant named as the default (e.g. PROTOCOLS)
                if expected != actual:
                    wrong.append(f"{qualname}({name}): documented {text}, is {actual!r}")
    assert not wrong, "\n".join(wrong)
