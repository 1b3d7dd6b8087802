"""Video-BLADE's system around the attention kernels: rectified-flow teachers, few-step samplers, TDM distillation."""

from .flow import euler_sample, flow_matching_loss, guided_velocity, time_grid
from .tdm import TDMConfig, fake_score_loss, generator_loss, renoise, rollout, student_step, student_times

__all__ = ["euler_sample", "flow_matching_loss", "guided_velocity", "time_grid",
           "TDMConfig", "fake_score_loss", "generator_loss", "renoise", "rollout", "student_step", "student_times"]
