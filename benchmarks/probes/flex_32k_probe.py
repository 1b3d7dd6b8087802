"""The probe behind flex_32k_probe.json (H100, commit 2dfab51, 2026-11-25): ours vs FlexAttention at S = 32K.

attention_speed.py's FlexAttention column ran out of memory at 32K (its ``create_block_mask``
was not compiled and materialised the 32K x 32K mask); this probe builds Flex's mask with
``_compile=True`` (now also in attention_speed.py) and times both on the same block masks.
"""

import json
import os
import time

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from sparsedistill.attention import BlockMask, block_sparse_attention
from sparsedistill.timing import time_ms

flex = torch.compile(flex_attention)
s, h, d, blk = 32768, 16, 128, 128
g = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
n = s // blk
res = []
dense = time_ms(lambda: F.scaled_dot_product_attention(q, k, v), graph=False, calls=5, reps=10)
for dens in (1.0, 0.25, 0.1):
    keep = torch.rand(1, h, n, n, device="cuda", generator=g) < dens
    keep |= torch.eye(n, dtype=torch.bool, device="cuda")
    m = BlockMask.from_block_bool(keep, blk, s)
    t0 = time.perf_counter()
    bm = create_block_mask(lambda b, hh, qi, ki: keep[b, hh, qi // blk, ki // blk], 1, h, s, s, device="cuda",
                           BLOCK_SIZE=blk, _compile=True)
    torch.cuda.synchronize()
    fm = (time.perf_counter() - t0) * 1e3
    with torch.no_grad():
        err = float((block_sparse_attention(q, k, v, m).float() - flex(q, k, v, block_mask=bm).float()).abs().max())
        r = {"S": s, "D": d, "H": h, "density": m.density(), "sdpa_ms": dense,
             "ours_ms": time_ms(lambda: block_sparse_attention(q, k, v, m), graph=False, calls=5, reps=10),
             "flex_ms": time_ms(lambda: flex(q, k, v, block_mask=bm), graph=False, calls=5, reps=10),
             "flex_mask_first_ms": fm, "max_err": err}
    print(r, flush=True)
    res.append(r)
    json.dump(res, open(os.environ.get("OUT", ".") + "/flex_32k.json", "w"), indent=1)
