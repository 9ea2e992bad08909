"""`make demo`'s pipeline at DEMO_FAST sizes: teacher sampling, KD pairs, stage 1, stage 2 for both
methods, TinyBench, report, pictures, README update."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import pytest

from tmd_train.toy import demo, toy_teacher_available

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not toy_teacher_available(), reason="the toy teacher is not shipped in this checkout")

KEYS = ["teacher", "teacher_fewstep", "tmd_stage1_M1", "tmd_stage1_M2", "dmd2v_M1", "dmd2v_M2", "tmd_M1", "tmd_M2"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    env = dict(os.environ, DEMO_FAST="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "tmd_train.toy.demo", "--out", str(out), "--threads", "2"], env=env,
                          capture_output=True, text=True, timeout=1200, cwd=str(ROOT))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_demo_writes_the_report(demo_run):
    summary = json.loads((demo_run / "results.json").read_text())
    rows = {r["key"]: r for r in summary["rows"]}
    assert [r["key"] for r in summary["rows"]] == KEYS  # fast: the "50-step" teacher is 4 steps too
    assert rows["tmd_M2"]["nfe"] == pytest.approx(2 * (1 + 1 / 6))
    assert rows["tmd_M1"]["nfe"] == pytest.approx(1 + 1 / 6)
    assert rows["dmd2v_M1"]["nfe"] == 1 and rows["dmd2v_M2"]["nfe"] == 2
    assert rows["teacher"]["nfe"] == 8 and rows["teacher_fewstep"]["nfe"] == 8  # fast: 4 steps × CFG
    for r in summary["rows"]:
        assert 0 <= r["total"] <= 100 and r["seconds"] > 0
    report = (demo_run / "report.md").read_text()
    for r in summary["rows"]:
        assert f"| {r['name']} |" in report
    for name in ["samples.png", "tinybench_vs_nfe.png"] + [f"samples_{k}.png" for k in KEYS]:
        img = iio.imread(demo_run / name)
        assert img.ndim == 3 and img.shape[0] > 50 and img.std() > 0, name
    for run in ("stage2_tmd_M1", "stage2_tmd_M2", "stage2_dmd2v_M1", "stage2_dmd2v_M2", "stage1_tmd_M1"):
        assert (demo_run / run / "student").is_dir(), run


def test_update_readme_replaces_only_the_marked_section(demo_run, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n\n{demo.README_BEGIN}\nold table\n{demo.README_END}\n\nafter\n")
    demo.update_readme(demo_run, readme, tmp_path / "docs")
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# title\n\nbefore") and text.endswith("after\n")
    assert "| TMD N2H1 M=2 |" in text and "![samples](docs/samples.png)" in text
    assert (tmp_path / "docs" / "samples.png").is_file()
    readme.write_text("no markers")
    with pytest.raises(ValueError, match="markers"):
        demo.update_readme(demo_run, readme, tmp_path / "docs")
