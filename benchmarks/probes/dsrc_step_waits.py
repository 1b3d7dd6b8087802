"""Which operations of one DSRC / B0 training step would make the host wait for a GPU, counted on the CPU.

A dispatch-mode counter over one step (merge of kept inputs, forwards, loss, backward) of the full-size detector on
four simulated frames of the full preset. It sees boolean selections and assignments, host reads of a scalar
(``.item()``, ``if tensor``) and host tensors made on the spot (``lift_fresh``: a blocking copy when made on a GPU,
none when pinned and copied asynchronously, as ``merge`` does now); it cannot see ``.tolist()`` (one read on a GPU).
The GPU test ``test_a_training_step_waits_for_the_gpu_only_where_the_pillars_check_their_input`` counts the real
waits on a card (CUDA's sync debug mode).

    python benchmarks/probes/dsrc_step_waits.py > benchmarks/probes/dsrc_step_waits_cpu.txt
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
from sparsedistill.models import create_model  # noqa: E402
from sparsedistill.perception import LidarConfig, SceneConfig, SimConfig  # noqa: E402
from sparsedistill.perception.anchors import make_anchors  # noqa: E402
from sparsedistill.perception.batching import collate, frame_inputs, merge  # noqa: E402
from sparsedistill.perception.frames import simulate_frame  # noqa: E402
from sparsedistill.perception.training import freeze, student_loss  # noqa: E402

SCALAR_READS = {"aten._local_scalar_dense.default", "aten.is_nonzero.default", "aten.item.default"}
DATA_DEPENDENT = {"aten.nonzero.default", "aten.masked_select.default"}


class WaitCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name in ("aten.index.Tensor", "aten.index_put_.default") and any(
                i is not None and i.dtype == torch.bool for i in args[1]):
            name += "(bool)"
        self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    def waits(self) -> dict[str, int]:
        return {k: v for k, v in sorted(self.ops.items())
                if k in SCALAR_READS | DATA_DEPENDENT or k.endswith("(bool)") or k == "aten.lift_fresh.default"}


def main() -> None:
    sim = SimConfig(SceneConfig(agents=(2, 5)), LidarConfig(rings=32, azimuths=1024))
    frames = [simulate_frame(s, sim) for s in range(4)]
    for name in ("b0", "dsrc"):
        torch.manual_seed(0)
        model = create_model("coop_detector", reconstruction=name == "dsrc").train()
        grid, acfg = model.cfg.grid, model.cfg.anchors
        anchors = make_anchors(grid, acfg).view(-1, 7)
        teacher = freeze(create_model("coop_detector", in_features=5)) if name == "dsrc" else None
        kept = [frame_inputs(f, grid, anchors, acfg, teacher=teacher is not None, reconstruction=name == "dsrc")
                for f in frames]
        with WaitCounter() as counter:
            loss, _ = student_loss(model, merge(kept), teacher)
            loss.backward()
        print(name, "aten ops", sum(counter.ops.values()), "candidates", counter.waits())
    # a detector's input at inference or under corruption: with the labels it does not read, and without
    frame = simulate_frame(5, sim)  # 4 agents
    for labels in (True, False):
        with WaitCounter() as counter:
            collate([frame], grid, labels=labels)
        print(f"collate of a frame of {frame.num_agents} agents, labels={labels}: aten ops", sum(counter.ops.values()),
              "candidates", counter.waits())


if __name__ == "__main__":
    main()
