"""Video-BLADE's system around the attention kernels: rectified-flow teachers, few-step samplers, TDM distillation."""

from .flow import euler_sample, flow_matching_loss, guided_velocity, time_grid

__all__ = ["euler_sample", "flow_matching_loss", "guided_velocity", "time_grid"]
