"""Collapse checks on the toy world: real clips (rendered by tmd_train.toy.clips, written as mp4 and read back)
raise no flag; a constant, a frozen and a duplicated clip raise exactly theirs — through
`python -m tmd_train.evaluate checks` and on clip tensors (a training run's sample grid)."""
from __future__ import annotations

import json

import torch

from tmd_train import evaluate
from tmd_train.evaluation import checks
from tmd_train.evaluation.checks import write_video
from tmd_train.toy.clips import make_batch


def _uint8(clips: torch.Tensor) -> torch.Tensor:
    """[B, 3, F, H, W] in [-1, 1] -> [B, F, H, W, 3] uint8."""
    return ((clips + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 4, 1)


def test_checks_flag_bad_videos_and_pass_real_ones(tmp_path, capsys):
    clips, prompts, _ = make_batch(8, seed=0)
    frames = _uint8(clips)
    for i, (p, f) in enumerate(zip(prompts, frames, strict=True)):
        write_video(tmp_path / f"{p}-{i}.mp4", f, 8)
    write_video(tmp_path / "a grey screen-0.mp4", torch.full_like(frames[0], 90), 8)
    write_video(tmp_path / "a frozen shape-0.mp4", frames[1][:1].expand_as(frames[1]).contiguous(), 8)
    for k in range(2):  # two seeds of one prompt, the same video
        write_video(tmp_path / f"a collapsed student-{k}.mp4", frames[2], 8)
    out = tmp_path / "report" / "checks.json"
    assert evaluate.main(["checks", "--videos", str(tmp_path), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    flags = {v["name"]: v["flags"] for v in report["videos"]}
    assert flags.pop("a grey screen-0.mp4") == ["constant", "static"]
    assert flags.pop("a frozen shape-0.mp4") == ["static"]
    assert flags.pop("a collapsed student-0.mp4") == ["duplicate"] == flags.pop("a collapsed student-1.mp4")
    assert len(flags) == 8 and not any(flags.values()), flags  # the real clips
    assert report["counts"] == {"constant": 1, "static": 2, "duplicate": 2} and report["num_flagged"] == 4
    assert "4 of 12 videos flagged" in capsys.readouterr().out
    assert evaluate.main(["checks", "--videos", str(tmp_path), "--strict"]) == 1
    assert evaluate.main(["checks", "--videos", str(tmp_path / "report")]) == 2  # no videos: a user error


def test_check_clips_on_tensors():
    """The in-memory form a training run's sample grid uses: same verdicts without an mp4 round trip."""
    clips, prompts, _ = make_batch(6, seed=1)
    assert checks.check_clips(clips, prompts)["num_flagged"] == 0
    bad = torch.cat([clips, clips[:1], torch.full_like(clips[:1], -0.2)])
    report = checks.check_clips(bad, [*prompts, prompts[0], "grey"])
    assert [v["flags"] for v in report["videos"]][-1] == ["constant", "static"]
    assert report["videos"][0]["duplicate_of"] == ["clip-6"]
    assert report["num_flagged"] == 3
