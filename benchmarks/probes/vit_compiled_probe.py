"""The probe behind vit_compiled_probe_*.json (run inline on the H100 at commit 2dfab51, 2026-11-25).

``vit_speed.py``'s full table did not fit a call (the fp16 plan choice took 180-206 s per batch
size then, since fixed by sharing plans across layers of one shape), so only the compiled int8 /
fp8 variants and the dense baselines ran, with vit_speed.py's own model builders and timing:

    cd benchmarks && python probes/vit_compiled_probe.py
"""

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import vit_speed as vs  # noqa: E402
from sparsedistill.timing import time_ms  # noqa: E402
from sparsedistill.weights.sparse24 import CUDAGraphed  # noqa: E402

CASES = (("vit_base_patch16_224", 256, ("int8", "fp8")), ("vit_base_patch16_224", 1, ("int8",)),
         ("vit_large_patch16_224", 256, ("int8", "fp8")))

res: dict = {}
for name, b, fmts in CASES:
    m = vs.pruned_vit(name)
    x = torch.randn(b, 3, 224, 224, device="cuda", dtype=torch.float16)
    r = res[f"{name}_b{b}"] = {}
    with torch.no_grad():
        ref = m(x).float()
        g = CUDAGraphed(m, x)
        r["dense_graph"] = time_ms(lambda: g(x), graph=False, calls=5, reps=20)
        c = torch.compile(m)
        c(x)
        r["dense_compile"] = time_ms(lambda: c(x), graph=False, calls=5, reps=20)
        sc = vs.input_scales(m, x)
        for fmt in fmts:
            t0 = time.time()
            f = CUDAGraphed(vs.ours(m, fmt, sc), x, compile=True)
            err = float((f(x).float() - ref).norm() / ref.norm())
            r[f"ours_{fmt}_compiled"] = {"ms": time_ms(lambda: f(x), graph=False, calls=5, reps=20), "err": err, "setup_s": time.time() - t0}
            print(name, b, fmt, r, flush=True)
    json.dump(res, open(os.environ.get("OUT", ".") + "/vit_compiled_probe.json", "w"), indent=1)
    del m, x
    torch.cuda.empty_cache()
