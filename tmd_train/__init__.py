"""tmd_train: Transition Matching Distillation of Wan video transformers (DESIGN.md).

Public API: :mod:`tmd_train.models` (``load_teacher``, ``TMDStudent``), :mod:`tmd_train.sampling`
(samplers and NFE), :mod:`tmd_train.schedules` (timestep shift and grids).
"""
from .models import Features, StudentConfig, TMDStudent, load_teacher, teacher_velocity
from .sampling import Sample, effective_nfe, sample_few_step, sample_teacher, sample_tmd
from .schedules import shift_time, shifted_grid

__all__ = ["Features", "Sample", "StudentConfig", "TMDStudent", "effective_nfe", "load_teacher",
           "sample_few_step", "sample_teacher", "sample_tmd", "shift_time", "shifted_grid",
           "teacher_velocity"]
