"""Where does the first evaluation of a 2:4 export spend its time on the GPU? (vit compress saw 66 s for fp16.)"""
import copy
import time

import torch

from sparsedistill.models import create_model
from sparsedistill.weights import NMSparsifier
from sparsedistill.weights.export import to_sparse24


def t(label, fn):
    torch.cuda.synchronize()
    a = time.time()
    out = fn()
    torch.cuda.synchronize()
    print(f"{label:40s} {time.time() - a:8.3f} s", flush=True)
    return out


inc = lambda n, m: n.rsplit(".", 1)[-1] in ("qkv", "proj", "fc1", "fc2")  # noqa: E731
base = create_model("vit_fmnist_tiny").eval()
NMSparsifier(2, 4, include=inc).step_to(base, 1.0)
x = torch.rand(1000, 1, 28, 28, device="cuda").half()
t("cuda init", lambda: torch.zeros(1, device="cuda"))
for fmt in ("fp16", "int8", "fp16"):
    m = copy.deepcopy(base)
    if fmt != "fp16":
        for mod in m.modules():
            pass
        from sparsedistill.weights.sparse24 import Sparse24Linear
        from sparsedistill.weights.quant import swap_linears
        swap_linears(m, lambda n, lin: Sparse24Linear.from_dense(lin.weight, lin.bias, fmt, 0.05) if inc(n, lin) else None)
    else:
        to_sparse24(m, fmt, inc)
    m = m.cuda().half()
    with torch.no_grad():
        t(f"{fmt} first compress (one layer)", lambda: torch._cslt_compress(m.blocks[0].attn.qkv.weight_q))
        t(f"{fmt} first forward b1000", lambda: m(x))
        t(f"{fmt} second forward b1000", lambda: m(x))
        t(f"{fmt} forward b500 (new token count)", lambda: m(x[:500]))
        t(f"{fmt} 10 forwards b1000", lambda: [m(x) for _ in range(10)])
