"""`make gpu-check DRY=1`: the GPU check's code paths at toy sizes on the CPU (every part, the JSON,
the summary table and the goal lines), and its time caps (a part out of time says so)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from support.run import ROOT


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_gpu_check_dry(tmp_path):
    out = tmp_path / "gpu-check.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(["make", "-s", "gpu-check", "DRY=1", f"PY={sys.executable}",
                           f"GPU_CHECK_ARGS=--out {out}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    res = json.loads(out.read_text())
    assert res["dry"] is True and res["env"]["torch"] and "device" in res["env"]
    assert res["build"]["status"].startswith("skipped: dry")
    assert res["pytest"]["status"] == "ok" and res["pytest"]["collected_cuda_tests"] > 10
    assert res["sanitizer"]["status"].startswith("skipped") and all(c["ran"] for c in res["sanitizer"]["cases"])
    ops = res["ops"]
    assert ops["status"] == "ok" and not ops["errors"], ops.get("errors")
    for op in ("adaln_modulate", "gated_fusion", "gated_fusion_linear", "flow_step", "meanflow_fd_loss"):
        rows = [r for r in ops["rows"] if r["op"] == op]
        assert {r["provider"] for r in rows} >= {"tmd", "eager"}, op
        assert {r["case"].rsplit(" ", 1)[-1] for r in rows} == {"fwd", "fwd+bwd"}, op
        assert all(r["ms"] > 0 for r in rows)
    assert any(r["provider"] == "cublas" and r["over_cublas"] == 1.0 for r in ops["rows"])
    for stage in ("stage1", "stage2"):
        st = res[stage]
        assert st["status"] == "ok", st
        assert st["s_per_iter"] > 0 and st["layers"] == 6
        assert st["planner_estimate_gb"] > 0 and st["planner"]["source"] == "planned live"  # the toy, planned now
    samp = res["sampler"]
    assert samp["status"] == "ok" and len(samp["rows"]) == 3
    assert samp["rows"][0]["nfe"] == 2 * samp["teacher_steps_timed"]
    assert all(r["realised_of_ideal"] > 0 for r in samp["rows"])
    goals = {g["goal"]: g for g in res["goals"]}
    assert any(k.startswith("gated_fusion_linear <=") for k in goals)
    assert all(g["pass"] is None for g in res["goals"])  # a dry run judges no goal
    assert "gpu-check on" in proc.stdout and "DRY RUN" in proc.stdout
    assert proc.stdout.count("n/a ") == len(res["goals"])


def test_gpu_check_reports_time_caps(tmp_path, monkeypatch):
    """A part whose cap is spent reports "skipped: time" instead of running over; unknown parts and
    bad caps are refused."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gpu_check

    out = tmp_path / "caps.json"
    rc = gpu_check.run_check(["--dry", "--parts", "env,ops", "--caps", "ops=0.5", "--out", str(out)])
    res = json.loads(out.read_text())
    assert rc == 0 and res["env"]["status"] == "ok"
    assert res["ops"]["status"] == "skipped: time" and res["ops"]["skipped_cases"] and not res["ops"]["done"]
    rc = gpu_check.run_check(["--dry", "--parts", "env,ops", "--budget", "0", "--out", str(out)])
    assert json.loads(out.read_text())["env"]["status"].startswith("skipped: time")
    for bad in (["--parts", "env,nope"], ["--caps", "ops"], ["--caps", "nope=3"]):
        with pytest.raises(SystemExit):
            gpu_check.run_check(["--dry", *bad])


def test_gpu_check_reads_stored_planner_estimates(tmp_path, monkeypatch):
    """On a GPU the stage rows take the planner's estimate from the stored file made by --plan-estimates,
    only for the configuration it was planned for (a changed configuration makes the entry stale)."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import gpu_check

    def fingerprint(stage, layers):
        cfg = gpu_check._stage_cfg(stage, {"dry": False}, layers, tmp_path / "run")
        return gpu_check._plan_fingerprint(cfg, gpu_check.WAN_LATENT, gpu_check.WAN_TEXT_LEN)

    monkeypatch.setattr(gpu_check, "PLAN_FILE", tmp_path / "plan.json")
    monkeypatch.setattr(gpu_check, "_plan_live", lambda stage, ctx, layers: {
        "peak_gb": 10.0 * stage + layers, "plan_s": 1.0, "fingerprint": fingerprint(stage, layers)})
    ctx = {"dry": False}
    assert gpu_check.planner_estimate(1, ctx, 30)["estimate_gb"] is None          # nothing stored yet
    assert gpu_check.run_check(["--plan-estimates", "--plan-layers", "30,8"]) == 0
    stored = json.loads((tmp_path / "plan.json").read_text())["estimates"]
    assert sorted(stored) == ["stage1-L30", "stage1-L8", "stage2-L30", "stage2-L8"]
    assert gpu_check.planner_estimate(2, ctx, 8)["estimate_gb"] == 28.0
    assert gpu_check.planner_estimate(1, ctx, 15)["estimate_gb"] is None          # not planned at L=15
    monkeypatch.setitem(gpu_check.WAN_1_3B, "ffn_dim", 4096)                        # the configuration changed
    stale = gpu_check.planner_estimate(1, ctx, 30)
    assert stale["estimate_gb"] is None and "stale" in stale["note"]
