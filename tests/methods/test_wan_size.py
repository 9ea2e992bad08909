"""Both stages at the real Wan2.1-T2V-1.3B width on CPU: the transformer config of the released
model (hidden 1536 = 12 heads × 128, FFN 8960, text 4096, 16 latent channels, patch 1×2×2, …) cut
to 2 blocks with a 1-block flow head and random weights, at a [16, 1, 4, 4] latent (4 tokens),
text length 8, batch 1. One stage-1 iteration (``tm_meanflow``, with its finite-difference pass)
and one stage-2 iteration of each method (``tmd``, ``dmd2v``) in which the generator AND the fake
score and discriminator update: every loss is finite, every trained network changes, the frozen
teacher does not. Catches what the 16-wide tiny teacher cannot: width-dependent shapes (the
discriminator on 1536 channels, the fusion MLP, the time embeddings at D = 1536) and memory."""
from __future__ import annotations

import math
import resource
import time

import pytest
import torch

from tmd_train.engine.config import config_from_dict
from tmd_train.methods import Stage1Config, Stage2Config, build_method

pytestmark = pytest.mark.slow

#: diffusers' transformer/config.json of Wan-AI/Wan2.1-T2V-1.3B-Diffusers, with num_layers 30 -> 2
WAN_1_3B = {
    "patch_size": [1, 2, 2], "num_attention_heads": 12, "attention_head_dim": 128, "in_channels": 16,
    "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 8960, "num_layers": 2,
    "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6, "image_dim": None,
    "added_kv_proj_dim": None, "rope_max_seq_len": 1024,
}
LATENT = [1, 4, 4]       # (F, H, W) of the 16-channel latent: 1 × 2 × 2 = 4 tokens
PEAK_RSS_GIB = 16        # peak resident memory of the process: fits comfortably on a 24 GB machine


def values(output_dir, **over) -> dict:
    out = dict(teacher=WAN_1_3B, head_blocks=1, synthetic_samples=2, synthetic_latent_size=LATENT,
               synthetic_text_len=8, batch_size=1, steps=1, lr=1e-4, log_every=1, checkpoint_every=1,
               output_dir=str(output_dir), seed=0)
    out.update(over)
    return out


#: parameters that one TMD-student update must move: backbone, flow head, output layer, fusion and
#: the head's zero-initialised time embedding
STUDENT_KEYS = ("transformer.blocks.0.attn1.to_q.weight", "transformer.blocks.1.ffn.net.2.weight",
                "transformer.proj_out.weight", "fusion.modulation.weight", "fusion.mlp.0.weight",
                "time_embed_delta.linear_2.weight")
WAN_KEYS = ("blocks.0.attn1.to_q.weight", "blocks.1.ffn.net.2.weight", "condition_embedder.time_proj.weight",
            "proj_out.weight")
Watch = dict[str, tuple[torch.nn.Module, tuple[str, ...] | None]]


def watched(models: Watch) -> dict[str, dict[str, torch.Tensor]]:
    """``{label: {name: parameter}}`` of the named parameters of each model (None: all of them)."""
    out = {}
    for label, (model, names) in models.items():
        params = dict(model.named_parameters())
        out[label] = {n: params[n] for n in (names or params)}
    return out


def one_iteration(method, finite: tuple[str, ...], trained: Watch, frozen: Watch) -> dict[str, float]:
    """Run step 1 of ``method`` (its first batch, :meth:`train_step`): the logged ``finite`` keys
    are finite numbers, every watched parameter of ``trained`` changed, none of ``frozen`` did, and
    the process's peak memory stays under :data:`PEAK_RSS_GIB`. Returns the logs."""
    params = watched({**trained, **frozen})
    before = {label: {n: p.detach().clone() for n, p in ps.items()} for label, ps in params.items()}
    batch = next(method.batches(1))
    start = time.perf_counter()
    logs = method.train_step(1, batch)
    print(f"\n[{method.name}] one iteration at Wan-1.3B width: {time.perf_counter() - start:.1f} s")
    bad = {k: logs.get(k) for k in finite if not math.isfinite(logs.get(k, math.nan))}
    assert not bad, (bad, logs)
    same = {label: sorted(n for n, p in ps.items() if torch.equal(p.detach(), before[label][n]))
            for label, ps in params.items()}
    for label in trained:
        assert not same[label], (label, same[label])
    for label in frozen:
        assert len(same[label]) == len(params[label]), label
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    assert peak < PEAK_RSS_GIB, f"peak RSS {peak:.1f} GiB"
    return logs


def test_stage1_tm_meanflow_at_wan_width(tmp_path):
    """One TM-MF iteration (every row r != s, so the FD pass runs)."""
    cfg = config_from_dict(Stage1Config, values(tmp_path, **{"objective.equal_fraction": 0.0}))
    method = build_method(cfg)
    tc = method.student.transformer.config
    assert (tc.num_attention_heads * tc.attention_head_dim, tc.ffn_dim, tc.text_dim) == (1536, 8960, 4096)
    logs = one_iteration(method, ("loss", "loss_fd", "mse", "grad_norm"),
                         trained={"student": (method.student, STUDENT_KEYS)}, frozen={})
    assert logs["frac_fd"] == 1.0 and logs["loss_fd"] > 0, logs
    assert method.guard.skipped == 0


@pytest.mark.parametrize("name", ["tmd", "dmd2v"])
def test_stage2_iteration_at_wan_width(tmp_path, name):
    """One DMD2-v iteration that is a generator step (generator_every=1), followed in the same
    iteration by the fake-score and discriminator updates (default blocks of L=2: 0 and 1)."""
    cfg = config_from_dict(Stage2Config, values(tmp_path, method=name, generator_every=1, disc_width=32,
                                                disc_groups=8))
    method = build_method(cfg)
    assert method.is_generator_step(1) and method.disc is not None and method.disc.blocks == (0, 1)
    generator_keys = STUDENT_KEYS if name == "tmd" else WAN_KEYS
    logs = one_iteration(method, ("loss_g", "loss_dmd", "loss_gan_g", "loss_fake", "loss_d", "grad_norm_g",
                                  "grad_norm_fake", "grad_norm_d"),
                         trained={"generator": (method.generator, generator_keys),
                                  "fake_score": (method.fake_score, WAN_KEYS), "discriminator": (method.disc, None)},
                         frozen={"teacher": (method.teacher.teacher, WAN_KEYS)})
    assert logs["loss_gan_g"] > 0 and logs["loss_d"] > 0
    assert all(g.skipped == 0 for g in method.guards.values())
    assert method.gen_updates == 1
