"""Small helpers shared by test files (imported as ``_helpers``: pytest puts tests/ on the path)."""


class Stop(Exception):
    """Raised by ``crash_after`` to simulate a run killed mid-training."""


def crash_after(loss_fn, calls: int):
    """``loss_fn`` that raises ``Stop`` on its ``calls + 1``-th call: a run that dies after a checkpoint."""
    seen = [0]

    def loss(net, batch):
        seen[0] += 1
        if seen[0] > calls:
            raise Stop
        return loss_fn(net, batch)

    return loss
