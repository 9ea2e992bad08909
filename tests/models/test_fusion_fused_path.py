"""GatedFusion's last Linear runs inside ``tmd_ext.gated_fusion_linear`` (residual operand ``e``): the
op each forward dispatches (counted at the dispatcher), the student still equal to the teacher at
init through that path, the same function as the unfused formula with trained parameters, and the
unfused path kept under an autocast narrower than ``m``."""
from __future__ import annotations

from collections import Counter

import pytest
import torch
from support.tiny import DIM, LATENT, randomize_zero_init, tiny_inputs, tiny_teacher
from torch.utils._python_dispatch import TorchDispatchMode

from tmd_train.models import GatedFusion, TMDStudent


class TmdOpCounter(TorchDispatchMode):
    """Counts the ``tmd::`` ops dispatched inside the context, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        if name.startswith("tmd::"):
            self.counts[name.split("::")[1].split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


def unfused(fusion: GatedFusion, m, e, s):
    """The formula of GatedFusion with the last Linear as a module call and the fusion elementwise."""
    shift, scale, g = fusion.modulation(fusion.act(fusion.time_embed(s))).chunk(3, dim=-1)
    a = torch.nn.functional.layer_norm(e, (e.shape[-1],), eps=fusion.eps) * (1 + scale[:, None]) + shift[:, None]
    z = e + fusion.mlp(a)
    lam = torch.sigmoid(fusion.alpha) * g[:, None]
    return m + lam * (z - m)


def test_gated_fusion_dispatches_the_fused_linear(gen):
    fusion = GatedFusion(DIM, hidden_dim=24)
    with torch.no_grad():
        for p in fusion.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    m, e = (torch.randn(2, 9, DIM, generator=gen) for _ in range(2))
    s = torch.rand(2, generator=gen)
    with TmdOpCounter() as counter:
        h = fusion(m, e, s)
    assert counter.counts == Counter({"adaln_modulate": 1, "gated_fusion_linear": 1}), counter.counts
    torch.testing.assert_close(h, unfused(fusion, m, e, s), atol=1e-5, rtol=1e-5)
    # gradients reach the last Linear and e through the op's residual operand
    mm, ee = m.clone().requires_grad_(), e.clone().requires_grad_()
    with TmdOpCounter() as counter:
        fusion(mm, ee, s).square().sum().backward()
    assert counter.counts["gated_fusion_linear_backward"] == 1
    assert fusion.mlp[2].weight.grad.abs().max() > 0 and ee.grad.abs().max() > 0


def test_student_equals_teacher_at_init_through_fused_path(gen):
    teacher = tiny_teacher(seed=2)
    student = TMDStudent.from_teacher(teacher, head_blocks=2)
    x, t, text = tiny_inputs(2, gen)
    y_s = torch.randn(2, *LATENT, generator=gen)
    s = torch.rand(2, generator=gen, dtype=torch.float64).float()
    with torch.no_grad():
        ref = teacher(x, 1000 * t, text, return_dict=False)[0]
        feats = student.backbone(x, t, text)
        with TmdOpCounter() as counter:
            out = student.head(y_s, s, s * 0.5, feats)
    assert counter.counts["gated_fusion_linear"] == 1 and counter.counts["gated_fusion"] == 0
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # and it is the fusion that makes it exact: with a trained (non-zero) gate the output moves
    randomize_zero_init(student, torch.Generator().manual_seed(5), scale=0.5)
    with torch.no_grad():
        moved = student.head(y_s, s, s * 0.5, feats)
    assert (moved - ref).abs().max() > 1e-3


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16])
def test_autocast_narrower_than_m_keeps_unfused_path(autocast_dtype, gen):
    """fp32 m under bf16 autocast: the Linear runs under autocast and the interpolation as
    gated_fusion in fp32, so h = m still holds exactly at init."""
    fusion = GatedFusion(DIM)
    m, e = (torch.randn(2, 5, DIM, generator=gen) for _ in range(2))
    s = torch.rand(2, generator=gen)
    with torch.autocast("cpu", dtype=autocast_dtype), TmdOpCounter() as counter:
        h = fusion(m, e, s)
    assert counter.counts["gated_fusion"] == 1 and counter.counts["gated_fusion_linear"] == 0
    assert h.dtype == torch.float32 and torch.equal(h, m)
    # bf16 m under bf16 autocast: the fused path
    mb, eb = m.bfloat16(), e.bfloat16()
    fusion_b = GatedFusion(DIM).bfloat16()
    with torch.autocast("cpu", dtype=autocast_dtype), TmdOpCounter() as counter:
        hb = fusion_b(mb, eb, s)
    assert counter.counts["gated_fusion_linear"] == 1 and torch.equal(hb, mb)
