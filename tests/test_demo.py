"""The demo as a study, on a tiny model: every stage, both validators, the report, reuse."""

import html
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest

import llm2bids
from llm2bids.cli.main import main
from llm2bids.demo import run_demo


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.figures = [], 0

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))
        if tag == "figcaption":
            self.figures += 1


@pytest.fixture(scope="module")
def demo(tmp_path_factory, tiny_dir):
    out = tmp_path_factory.mktemp("demo")
    result = run_demo(out, model=str(tiny_dir("llama")), quick=True, verbose=0)
    return out, result


def test_demo_outputs_validate_and_report_parses(demo):
    out, result = demo
    assert llm2bids.validate(result["bids"]).valid
    assert llm2bids.validate(result["derivatives"]).valid
    parser = _Images()
    text = Path(result["report"]).read_text()
    parser.feed(text)
    assert len(parser.images) >= 8 and parser.figures == len(parser.images)
    assert all(img["src"].startswith("data:image/png;base64,") for img in parser.images)
    for img in parser.images:  # each embedded figure also exists as PNG and SVG
        png = result["derivatives"] / img["alt"]
        assert png.exists() and png.with_suffix(".svg").exists()
    for section in (
        "Functional networks",
        "Recurrence",
        "Localizer",
        "Lesions",
        "Keep only",
        "Pruned model",
        "Methods",
        "NOT BRAIN DATA",
    ):
        assert section in text
    assert "A voxel is one MLP neuron" in text
    # the methods say what the sidecars say, not what the code once did
    assert "sliding windows of 256 tokens, stride 128" in text
    assert "smoothing_fwhm = None" in text and "random_state = 0" in text


def test_rerun_reuses_stages(demo, tiny_dir):
    out, result = demo
    bold = sorted(result["bids"].rglob("*_bold.nii"))[0]
    keys = sorted(result["derivatives"].rglob("*_keyneurons.tsv"))[0]
    stamps = (bold.stat().st_mtime_ns, keys.stat().st_mtime_ns)
    run_demo(out, model=str(tiny_dir("llama")), quick=True, verbose=0)
    assert (bold.stat().st_mtime_ns, keys.stat().st_mtime_ns) == stamps


def test_report_command_regenerates_from_derivatives(demo, tmp_path):
    _, result = demo
    copy = tmp_path / "deriv"
    shutil.copytree(result["derivatives"], copy)
    shutil.rmtree(copy / "figures")
    (copy / "sub-tinyllama.html").unlink()
    assert main(["report", str(copy)]) == 0
    assert (copy / "sub-tinyllama.html").exists() and (copy / "figures").exists()


def _chromium(tmp_path, *args):
    """Headless Debian chromium (CI installs it: a missing one fails there, never skips)."""
    return subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=10000",
            *args,
        ],
        check=True,
        timeout=120,
        capture_output=True,
        text=True,
    )


@pytest.mark.skipif(
    shutil.which("chromium") is None and not os.environ.get("CI"),
    reason="Debian chromium is not installed (apt-get install chromium; CI installs it)",
)
def test_report_renders_in_headless_chromium_without_layout_faults(demo, tmp_path):
    """Rendered 1400 px wide: nothing runs past the margin, no text block overlaps another."""
    _, result = demo
    page = Path(result["report"]).read_text()
    checker = (Path(__file__).parent / "report_layout.js").read_text()
    probe = tmp_path / "report.html"
    probe.write_text(page.replace("</body>", f"<script>{checker}</script></body>"))
    dom = _chromium(tmp_path, "--window-size=1400,1000", "--dump-dom", probe.as_uri()).stdout
    found = re.search(r'<pre id="llm2bids-layout">(.*?)</pre>', dom, flags=re.S)
    assert found, "the layout probe did not run"
    layout = json.loads(html.unescape(found.group(1)))
    assert not layout["pageOverflow"] and not layout["overflow"], layout["overflow"]
    assert not layout["overlaps"], layout["overlaps"]
    shot = tmp_path / "report.png"  # the full page, as a person would scroll through it
    height = min(layout["height"], 16000)
    _chromium(tmp_path, f"--window-size=1400,{height}", f"--screenshot={shot}", probe.as_uri())
    assert shot.stat().st_size > 50_000


def test_readme_section_is_written_from_the_demo_files(demo, tmp_path):
    import importlib.util

    import pandas as pd

    spec = importlib.util.spec_from_file_location(
        "readme_demo", Path(__file__).parents[1] / "docs" / "readme_demo.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, result = demo
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{module.START}\nstale numbers\n{module.END}\nrest\n")
    section = module.demo_section(out)
    assert f"wrote {len(llm2bids.find_runs(result['bids']))} runs" in section
    from llm2bids.bids.path import BIDSPath, subjects

    (sub,) = subjects(result["derivatives"])
    keys = BIDSPath(
        subject=sub,
        acquisition="mlp",
        description="canica",
        suffix="keyneurons",
        extension=".tsv",
        root=result["derivatives"],
    ).fpath
    n_keys = len(pd.read_csv(keys, sep="\t").drop_duplicates(["layer", "neuron"]))
    assert f"{n_keys} key neurons" in section
    import subprocess as sp
    import sys

    sp.run(
        [sys.executable, str(Path(spec.origin)), str(out), "--readme", str(readme)],
        check=True,
        capture_output=True,
    )
    text = readme.read_text()
    assert "stale numbers" not in text and section in text and text.endswith("rest\n")


def test_a_second_demo_in_a_fresh_process_writes_byte_identical_tables(demo, tiny_dir, tmp_path):
    """Two demos (here the small one) agree byte for byte: every derivative table, the
    participants and events files, and the decomposition's convergence (none missed)."""
    out, _ = demo
    again = tmp_path / "again"
    command = [sys.executable, "-m", "llm2bids", "-q", "demo", str(again), "--quick"]
    subprocess.run(command + ["--model", str(tiny_dir("llama"))], check=True, timeout=900)
    tables = sorted(p.relative_to(out) for p in out.rglob("*.tsv"))
    assert len(tables) > 10 and tables == sorted(p.relative_to(again) for p in again.rglob("*.tsv"))
    for table in tables:
        if "_pruning.tsv" in table.name:  # latencies: compare the rest
            first, second = (pd.read_csv(root / table, sep="\t") for root in (out, again))
            timed = [c for c in first.columns if c.endswith("_ms")]
            pd.testing.assert_frame_equal(first.drop(columns=timed), second.drop(columns=timed))
            continue
        assert (out / table).read_bytes() == (again / table).read_bytes(), table
    sidecars = list(out.rglob("*_components.json"))
    assert sidecars and all(
        json.loads(p.read_text())["SolverCallsNotConverged"] == 0 for p in sidecars
    )


def test_every_bids_uri_of_the_demo_resolves_to_a_file(demo):
    """The derivatives link the raw dataset (DatasetLinks), and every ``bids:`` URI their
    sidecars hold (Sources of networks, localizer, lesions) names a file that exists."""
    from llm2bids.derivatives import resolve_bids_uri

    out, result = demo
    deriv = result["derivatives"]
    links = json.loads((deriv / "dataset_description.json").read_text())["DatasetLinks"]
    assert (deriv / links["raw"].removeprefix("file://")).resolve() == result["bids"].resolve()
    uris = []

    def collect(value):
        if isinstance(value, str) and value.startswith("bids:"):
            uris.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                collect(v)
        elif isinstance(value, list):
            for v in value:
                collect(v)

    for sidecar in deriv.rglob("*.json"):
        collect(json.loads(sidecar.read_text()))
    assert any(u.startswith("bids:raw:") for u in uris)
    assert any(u.startswith("bids::") for u in uris)  # a lesion table's neuron set
    for uri in uris:
        assert resolve_bids_uri(uri, deriv).is_file(), uri
