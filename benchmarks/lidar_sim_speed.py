"""Simulator speed: multi-agent LiDAR frames per second (scene drawing + every agent's scan), CPU and GPU.

The DSRC recipe simulates its training set where it trains (datasets do not travel to the GPU machine), so
this decides how long a run's start takes. Frames of the full preset (2-5 agents, 32 rings x 1024 azimuths,
~110 primitives) and of 64 rings x 2048 azimuths; each figure the median over repeats of ``--frames`` frames.

    python benchmarks/lidar_sim_speed.py --devices cpu cuda --out benchmarks/results/lidar_sim_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from sparsedistill.perception import LidarConfig, SceneConfig, SimConfig  # noqa: E402
from sparsedistill.perception.frames import frames_per_second  # noqa: E402
from sparsedistill.runs import environment  # noqa: E402

SENSORS = {"32x1024": LidarConfig(rings=32, azimuths=1024), "64x2048": LidarConfig(rings=64, azimuths=2048)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    ap.add_argument("--frames", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/lidar_sim_speed.json"))
    args = ap.parse_args()
    env = {**environment(), "command": " ".join([sys.executable, *sys.argv]), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
           "cpu_threads": torch.get_num_threads()}
    env["commit"] = os.environ.get("SPARSEDISTILL_COMMIT") or env["commit"]
    rows = []
    for device in args.devices:
        for name, lidar in SENSORS.items():
            sim = SimConfig(SceneConfig(), lidar)
            runs = [frames_per_second(args.frames, sim, device) for _ in range(args.repeats)]
            rows.append({"device": device if device == "cpu" else torch.cuda.get_device_name(), "sensor": name,
                         "frames_per_s": statistics.median(runs), "runs": runs, "frames": args.frames})
            print(rows[-1], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"environment": env, "results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
