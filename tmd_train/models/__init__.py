"""Models: the Wan teacher loader and the TMD student (backbone + flow head)."""
from .fusion import ConcatFusion, GatedFusion
from .student import Features, StudentConfig, TMDStudent, unpatchify
from .teacher import load_teacher, teacher_velocity, wan_timestep
from .time_embed import SmoothTimeEmbedding

__all__ = ["ConcatFusion", "Features", "GatedFusion", "SmoothTimeEmbedding", "StudentConfig", "TMDStudent",
           "load_teacher", "teacher_velocity", "unpatchify", "wan_timestep"]
