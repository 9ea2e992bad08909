"""The training engine every method runs on.

* :mod:`.config` — typed configs from YAML + ``key=value`` overrides (nested sub-configs,
  ``objective.cfg_scale=3``), the shared :class:`~.config.TrainConfig`.
* :mod:`.context` — the run context (device, rank/world, autocast).
* :mod:`.data` — the step-indexed data order and the per-step loader.
* :mod:`.distributed` — FSDP2 sharding, replicated-gradient averaging, clipping, all-reduce.
* :mod:`.optim` — AdamW, the learning-rate warm-up and the guarded optimizer update.
* :mod:`.ema` — the EMA of a (sharded) module.
* :mod:`.checkpoint` — atomic sharded checkpoints (torch.distributed.checkpoint), ``--resume``, RNG states.
* :mod:`.consolidate` — the streaming export of sharded weights into a model folder.
* :mod:`.logging` — TensorBoard + ``metrics.jsonl`` scalars, throughput.
* :mod:`.seeding` — per-(step, chunk) generators.
* :mod:`.trainer` — :class:`~.trainer.Method` (what a method implements) and :func:`~.trainer.fit`.
* :mod:`.cli` — the shared stage command line.
"""
from .config import TrainConfig, config_from_dict, load_config, save_config
from .trainer import Method, fit

__all__ = ["Method", "TrainConfig", "config_from_dict", "fit", "load_config", "save_config"]
