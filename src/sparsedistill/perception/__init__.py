"""Collaborative LiDAR perception on simulated multi-vehicle scans (issue 23, DSRC).

``scene`` (procedural roads) -> ``lidar`` (a PyTorch ray caster) -> ``frames`` (every agent's scan, poses, boxes)
-> ``corruptions`` (Robo3D's eight at three levels) -> ``pillars`` (BEV features) -> ``fusion`` (across agents)
-> ``anchors`` (targets, losses, decoding) -> ``metrics`` (rotated BEV IoU, AP, Robo3D's CE / RR, bootstrap).
The detector network itself is ``models.coop_detector``.
"""

from .corruptions import CORRUPTIONS, LEVELS, ScanContext, corrupt, corruption_names
from .frames import Frame, SimConfig, corrupt_frame, simulate_frame, split_seeds
from .lidar import LidarConfig, scan
from .metrics import (FrameMatches, average_precision, bev_corners, corruption_error, match_frames, mean_ce, mean_rr,
                      paired_bootstrap_delta_ap, resilience_rate, rotated_iou_bev)
from .pillars import BEVGrid
from .scene import Scene, SceneConfig, simulate_scene

__all__ = ["CORRUPTIONS", "LEVELS", "ScanContext", "corrupt", "corruption_names", "Frame", "SimConfig", "corrupt_frame",
           "simulate_frame", "split_seeds", "LidarConfig", "scan", "FrameMatches", "average_precision", "bev_corners",
           "corruption_error", "match_frames", "mean_ce", "mean_rr", "paired_bootstrap_delta_ap", "resilience_rate",
           "rotated_iou_bev", "BEVGrid", "Scene", "SceneConfig", "simulate_scene"]
