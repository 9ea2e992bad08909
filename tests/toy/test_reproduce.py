"""`make reproduce` at --quick sizes: an interrupted run resumes (finished runs skipped, unfinished stage 2
continued from its checkpoint), a rerun does nothing, --aggregate-only regenerates the report from whatever
records exist, --plan runs nothing."""
from __future__ import annotations

import json
import os
from pathlib import Path

import imageio.v3 as iio
import pytest
import torch

from tmd_train.errors import UserError
from tmd_train.toy import reproduce, toy_teacher_available

pytestmark = pytest.mark.skipif(not toy_teacher_available(), reason="the toy teacher is not shipped in this checkout")

CELLS = "teacher_2,tmd_N2H1_M2"


class Interrupted(Exception):
    pass


def _args(tmp: Path, *extra: str) -> list[str]:
    return ["--quick", "--cells", CELLS, "--out", str(tmp / "out"), "--results", str(tmp / "results"),
            "--report", str(tmp / "results.md"), "--threads", str(torch.get_num_threads()), *extra]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One quick run killed after its first stage-2 chunk, then rerun to the end; the stage calls of each."""
    tmp = tmp_path_factory.mktemp("reproduce")
    old_cache = os.environ.get("TMD_TINYBENCH_CACHE")
    os.environ["TMD_TINYBENCH_CACHE"] = str(tmp / "cache")
    real_stage = reproduce.run_stage
    calls: dict[str, list[list[str]]] = {"first": [], "second": [], "third": []}
    phase = "first"

    def stage(module, args):
        calls[phase].append([module, *args])
        real_stage(module, args)
        if phase == "first" and module == "stage2":
            raise Interrupted  # killed after the first chunk (its checkpoint written)

    reproduce.run_stage = stage
    try:
        with pytest.raises(Interrupted):
            reproduce.main(_args(tmp))
        run_dir = tmp / "out" / "cells" / "tmd_N2H1_M2" / "seed0"
        state = {"checkpoints": sorted(p.name for p in run_dir.glob("checkpoint-*")),
                 "curve": json.loads((run_dir / "curve.json").read_text())["points"]}
        phase = "second"
        assert reproduce.main(_args(tmp)) == 0
        record = tmp / "results" / "runs" / "tmd_N2H1_M2" / "seed0.json"
        stamp = record.stat().st_mtime_ns
        phase = "third"
        assert reproduce.main(_args(tmp)) == 0
        state["record_unchanged"] = record.stat().st_mtime_ns == stamp
    finally:
        reproduce.run_stage = real_stage
        if old_cache is None:
            os.environ.pop("TMD_TINYBENCH_CACHE", None)
        else:
            os.environ["TMD_TINYBENCH_CACHE"] = old_cache
    return tmp, calls, state


def test_interrupted_run_resumes_and_a_rerun_skips(run):
    tmp, calls, state = run
    # the first invocation: the teacher cell finished, stage 1 trained, stage 2 killed after its first chunk
    assert (tmp / "results" / "runs" / "teacher_2" / "seed0.json").is_file()
    assert [c[0] for c in calls["first"]] == ["stage1", "stage2"]
    assert state["checkpoints"] == ["checkpoint-0000001"]
    assert [p["steps"] for p in state["curve"]] == [0]  # killed before scoring the chunk
    # the second: no stage 1 again; stage 2 resumes at its checkpoint (the chunk that has no score yet: nothing
    # left to train, its student is exported and scored), then trains the last chunk from there
    assert [c[0] for c in calls["second"]] == ["stage2", "stage2"]
    assert all("--resume" in c for c in calls["second"])
    assert "steps=1" in calls["second"][0] and "steps=2" in calls["second"][1]
    run_dir = tmp / "out" / "cells" / "tmd_N2H1_M2" / "seed0"
    changes = [json.loads(line) for line in (run_dir / "config_changes.jsonl").read_text().splitlines()]
    assert changes[-1]["step"] == 1 and changes[-1]["changes"]["steps"] == {"old": 1, "new": 2}
    assert not list(run_dir.glob("checkpoint-*"))  # finished: checkpoints dropped
    # the third: everything done, nothing runs, nothing rewritten
    assert calls["third"] == [] and state["record_unchanged"]
    rec = json.loads((tmp / "results" / "runs" / "tmd_N2H1_M2" / "seed0.json").read_text())
    assert [p["steps"] for p in rec["curve"]] == [0, 1, 2]
    assert rec["nfe"] == pytest.approx(2 * (1 + 1 / 6))
    for key in ("total", "semantic", "teacher_fd", "teacher_agreement", "fidelity"):
        assert key in rec["scores"]
    assert json.loads((run_dir / "tinybench.json").read_text()) == rec["scores"]


def test_report_and_aggregate_only(run):
    tmp, _, _ = run
    report = tmp / "results.md"
    text = report.read_text()
    assert "runs finished: 2 of 2" in text and "| TMD N2H1 M=2 | 2×(N=2) | 2.33 | 1 |" in text
    assert "| teacher 2×CFG | 2×2 | 4 | 1 |" in text
    for name in ("curves.png", "tinybench_vs_nfe.png", "samples.png", "samples/tmd_N2H1_M2.png"):
        img = iio.imread(tmp / "results" / name)
        assert img.ndim == 3 and img.std() > 0, name
    # partial: one record gone -> the table shows what is left, nothing is trained
    (tmp / "results" / "runs" / "teacher_2" / "seed0.json").rename(tmp / "teacher_record.json")
    report.unlink()
    try:
        assert reproduce.main(_args(tmp, "--aggregate-only")) == 0
        text = report.read_text()
        assert "runs finished: 1 of 2" in text and "| teacher 2×CFG |" not in text
        assert "| TMD N2H1 M=2 |" in text
    finally:
        (tmp / "teacher_record.json").rename(tmp / "results" / "runs" / "teacher_2" / "seed0.json")


def test_stale_records_are_ignored(run, tmp_path):
    tmp, _, _ = run
    results = tmp_path / "results"
    src = tmp / "results" / "runs" / "tmd_N2H1_M2" / "seed0.json"
    rec = json.loads(src.read_text())
    rec["fingerprint"] = "other-settings"
    (results / "runs" / "tmd_N2H1_M2").mkdir(parents=True)
    (results / "runs" / "tmd_N2H1_M2" / "seed0.json").write_text(json.dumps(rec))
    assert reproduce.main(["--quick", "--cells", CELLS, "--out", str(tmp_path / "out"), "--results", str(results),
                           "--report", str(tmp_path / "r.md"), "--aggregate-only"]) == 0
    assert "runs finished: 0 of 2" in (tmp_path / "r.md").read_text()


def test_plan_runs_nothing(capsys, tmp_path):
    assert reproduce.main(["--plan", "--out", str(tmp_path / "never")]) == 0
    text = capsys.readouterr().out
    for key in ("teacher_full", "dmd2v_M4", "tmd_N2H2_M2", "abl_tm_init", "abl_last_step", "abl_cfg_teacher"):
        assert key in text
    assert "estimated total" in text and not (tmp_path / "never").exists()
    _, seconds = reproduce.plan(reproduce.Settings(), reproduce.make_cells(reproduce.Settings()))
    assert 0 < seconds <= 3 * 3600
    with pytest.raises(UserError, match="unknown cell"):
        reproduce.main(["--plan", "--cells", "nope"])


def test_findings_follow_the_numbers():
    settings = reproduce.Settings()
    cells = reproduce.make_cells(settings)

    def stats(tmd, dmd):
        return {"tmd_N2H1_M2": {"total": tmd}, "dmd2v_M2": {"total": dmd}}

    text = reproduce.findings(cells, stats((20.0, 1.0, 3), (30.0, 1.0, 3)), {}, settings)
    assert "TMD N2H1 M=2 (NFE 2.33) is lower than DMD2-v M=2" in text and "-10.0 ± 0.8 s.e." in text
    text = reproduce.findings(cells, stats((31.0, 1.0, 3), (30.0, 1.0, 3)), {}, settings)
    assert "is not distinguishable from DMD2-v M=2" in text
    text = reproduce.findings(cells, stats((35.0, 1.0, 3), (30.0, 1.0, 3)), {}, settings)
    assert "is higher than DMD2-v M=2" in text
    text = reproduce.findings(cells, stats((35.0, 0.0, 1), (30.0, 0.0, 1)), {}, settings)
    assert "is higher than DMD2-v M=2" in text and "one seed: no uncertainty" in text
    # a curve that still rises over its last chunk is reported as such
    curve = [{"steps": s, "total": t} for s, t in zip(reproduce.curve_steps(settings), (10, 11, 12, 13, 20),
                                                      strict=True)]
    recs = {"dmd2v_M2": [{"scores": {}, "curve": curve}]}
    text = reproduce.findings(cells, stats((35.0, 0.0, 1), (30.0, 0.0, 1)), recs, settings)
    assert "Curves still moving at the end" in text and "DMD2-v M=2 (+7.0 in the last" in text
    assert "Partial results: some cells have only 1 of 3 seeds" in text


def test_fingerprint_ignores_later_fields_at_their_defaults():
    """Cells that do not use the fields added after the first records keep their fingerprints (so those records
    stay valid); a diagnosis cell differs from its base."""
    import hashlib
    from dataclasses import asdict

    settings = reproduce.Settings()
    cells = {c.key: c for c in reproduce.make_cells(settings)}
    base = cells["tmd_N2H1_M2"]
    s = asdict(settings)
    s.pop("seeds")
    s.pop("diagnosis_seeds")
    c = {k: v for k, v in asdict(base).items() if k not in reproduce._LATER_FIELDS}
    old = hashlib.sha256(json.dumps({"settings": s, "cell": c, "teacher": "t"}, sort_keys=True).encode()).hexdigest()
    assert reproduce.fingerprint(settings, base, "t") == old[:20]
    prints = {reproduce.fingerprint(settings, cell, "t") for cell in cells.values()}
    assert len(prints) == len(cells)
    # the number of diagnosis seeds does not change any fingerprint
    other = reproduce.Settings(diagnosis_seeds=3)
    assert all(reproduce.fingerprint(other, c, "t") == reproduce.fingerprint(settings, c, "t") for c in cells.values())


def test_diagnosis_cells_change_one_thing_of_their_base(tmp_path):
    from tmd_train.engine.config import parse_overrides

    settings = reproduce.Settings()
    cells = {c.key: c for c in reproduce.make_cells(settings)}
    diag = [c for c in cells.values() if c.diagnosis]
    assert len(diag) >= 5
    rep = reproduce.Reproduce(tmp_path / "out", tmp_path / "results", settings, reproduce.TOY_TEACHER_DIR,
                              list(cells.values()))
    for c in diag:
        base = cells[c.base]
        assert not base.diagnosis and not base.ablation and (c.kind, c.M, c.H) == (base.kind, base.M, base.H)
        assert settings.seeds_of(c) == 2 and settings.seeds_of(base) == 3
        assert sum(map(bool, (c.stage2_args, c.stage1_steps, c.stage1_lr, c.stage1_args, c.no_stage1))) == 1, c.key
        args = rep.stage2_args(c, tmp_path / "run", 0, 10, tmp_path / "init", None)
        base_args = rep.stage2_args(base, tmp_path / "run", 0, 10, tmp_path / "init", None)
        got, want = parse_overrides(args[2:]), parse_overrides(base_args[2:])  # after "--resume latest"
        changed = {k for k in got.keys() | want.keys() if got.get(k) != want.get(k)}
        assert changed == {a.split("=", 1)[0] for a in c.stage2_args}, (c.key, changed)
        if c.no_stage1:
            assert not any(a.startswith("init_student=") for a in rep.stage2_args(c, tmp_path / "r", 0, 10, None, None))
        if c.stage1_steps or c.stage1_lr or c.stage1_args:
            assert c.stage1_key != base.stage1_key
            assert (reproduce.stage1_fingerprint(settings, c, "t")
                    != reproduce.stage1_fingerprint(settings, base, "t"))
    assert reproduce.Settings.quick().seeds_of(diag[0]) == 1


def test_findings_name_peaked_curves_and_diagnoses():
    settings = reproduce.Settings()
    cells = reproduce.make_cells(settings)
    steps = reproduce.curve_steps(settings)
    falling = [{"steps": s, "total": t} for s, t in zip(steps, (55, 54, 47, 46, 46.5), strict=True)]
    flat = [{"steps": s, "total": t} for s, t in zip(steps, (40, 41, 42, 42.5, 42.5), strict=True)]
    recs = {"dmd2v_M2": [{"seed": k, "curve": falling, "scores": {"total": 49.0 + k}} for k in range(3)],
            "why_dmd2v_M2_lr1e-5": [{"seed": k, "curve": flat, "scores": {"total": 55.5 + k}} for k in range(2)]}
    stats = {"dmd2v_M2": {"total": (49.0, 1.0, 3)}, "why_dmd2v_M2_lr1e-5": {"total": (56.0, 1.0, 2)}}
    text = reproduce.findings(cells, stats, recs, settings)
    assert "peak before the end" in text and "DMD2-v M=2 (55.0 at 0, 46.5 at 250)" in text
    assert "Diagnosis, DMD2-v M=2, lr 1e-5" in text and "higher than DMD2-v M=2" in text
    assert "Partial results" not in text  # a diagnosis cell with 2 seeds is complete
    table = reproduce.diagnosis_table(cells, stats, recs)
    assert "| DMD2-v M=2 | the recipe (base) | 3 | 49.0 ± 1.0 |" in table
    assert "55.0 → 55.0 (0) → 46.5" in table and "40.0 → 42.5 (188) → 42.5" in table
    assert "+6.5 ± 0.0 (n = 2)" in table and "paired by seed +6.5 ± 0.0 (n = 2)" in text


def test_update_readme_replaces_only_its_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- reproduce:begin (old) -->\nold body\n<!-- reproduce:end -->\noutro\n")
    reproduce.update_readme(readme, "new body")
    assert readme.read_text() == (f"intro\n{reproduce.README_BEGIN}\nnew body\n{reproduce.README_END}\noutro\n")
    readme.write_text("no markers\n")
    with pytest.raises(UserError, match="no reproduce markers"):
        reproduce.update_readme(readme, "x")
    with pytest.raises(UserError, match="--update-readme"):
        reproduce.main(["--quick", "--update-readme", "--out", str(tmp_path / "o")])


def test_paired_differences_use_common_seeds():
    def recs(*totals, seeds=None):
        return [{"seed": s, "scores": {"total": t}} for s, t in zip(seeds or range(len(totals)), totals, strict=True)]

    records = {"a": recs(50.0, 47.0, 45.0), "b": recs(49.0, 46.2, 43.8, seeds=[0, 1, 2])}
    mean, sd, n = reproduce.paired(records, "a", "b")
    assert n == 3 and abs(mean - 1.0) < 1e-9 and abs(sd - 0.2) < 1e-9
    # the shared seed-to-seed spread (5 points) cancels: paired says higher, the unpaired test cannot
    assert reproduce._paired_verdict((mean, sd, n)) == "higher than"
    assert reproduce._compare((47.33, 2.5, 3), (46.33, 2.6, 3))[2] == "not distinguishable from"
    assert reproduce.paired({"a": recs(1.0), "b": recs(2.0, seeds=[5])}, "a", "b") is None
    assert reproduce._paired_verdict((1.0, 0.0, 1)) is None
    assert reproduce._paired_verdict((0.3, 1.0, 3)) == "not distinguishable from"
    assert reproduce._paired_text((1.0, 0.2, 3)) == "+1.0 ± 0.2 (n = 3)"


def test_verdicts_use_student_t_thresholds():
    assert reproduce.t95(1) == 12.706 and reproduce.t95(2.5) == 4.303 and reproduce.t95(100) == 1.96
    # 3 seeds a side: Welch df = 4, threshold 2.78 s.e.; a 2.45 s.e. difference is not called one
    diff, se, verdict = reproduce._compare((10.0, 1.0, 3), (8.0, 1.0, 3))
    assert abs(se - (2 / 3) ** 0.5) < 1e-12 and verdict == "not distinguishable from"
    assert reproduce._compare((10.5, 1.0, 3), (8.0, 1.0, 3))[2] == "higher than"
    # 3 pairs: t(2) = 4.30; with 2 pairs the paired test does not decide (the unpaired one does)
    assert reproduce._paired_verdict((2.5, 1.0, 3)) == "higher than"
    assert reproduce._paired_verdict((2.5, 1.1, 3)) == "not distinguishable from"
    assert reproduce._paired_verdict((2.5, 0.2, 2)) is None
