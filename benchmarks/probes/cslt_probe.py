"""Which torch._cslt_sparse_mm call forms work on this card? Each case runs in its own process,
since a bad one can leave an illegal-instruction error that poisons the CUDA context."""
import subprocess
import sys

CASE = r'''
import torch, sys
torch.manual_seed(0)
dtype, transpose, search, alpha, out = sys.argv[1], sys.argv[2] == "T", sys.argv[3] == "S", sys.argv[4] == "A", sys.argv[5]
M, K, N = 3072, 768, 8192
w = torch.randn(M, K, device="cuda")
g = w.abs().reshape(M, -1, 4); keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.topk(2, -1).indices, True)
w = w * keep.reshape(M, K)
x = torch.randn(N, K, device="cuda")
dt = {"fp16": torch.float16, "int8": torch.int8, "fp8": torch.float8_e4m3fn}[dtype]
if dtype == "int8":
    wq, xq = (w * 20).round().clamp(-127, 127).to(dt), (x * 20).round().clamp(-127, 127).to(dt)
else:
    wq, xq = w.to(dt), x.to(dt)
od = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16, "int32": torch.int32}[out]
a = torch.ones(1, device="cuda") if alpha else None
wc = torch._cslt_compress(wq)
alg = torch._cslt_sparse_mm_search(wc, xq.t(), alpha=a, out_dtype=od, transpose_result=transpose) if search else 0
y = torch._cslt_sparse_mm(wc, xq.t(), alpha=a, out_dtype=od, transpose_result=transpose, alg_id=alg)
torch.cuda.synchronize()
ref = wq.double() @ xq.double().t()  # (M, N) = W X^T
ref = ref if tuple(y.shape) == (M, N) else ref.t()
err = float((y.double() - ref).norm() / ref.norm())
print(f"OK shape={tuple(y.shape)} dtype={y.dtype} alg={alg} rel_err={err:.2e}")
'''

cases = []
for dtype in ("fp16", "int8", "fp8"):
    outs = {"fp16": ["none"], "int8": ["none", "fp16", "bf16", "int32"], "fp8": ["fp16", "bf16"]}[dtype]
    for out in outs:
        for transpose in ("T", "F"):
            for search in ("S", "0"):
                for alpha in (["A", "0"] if dtype != "fp16" else ["0"]):
                    cases.append((dtype, transpose, search, alpha, out))
for c in cases:
    p = subprocess.run([sys.executable, "-c", CASE, *c], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "CUDA_LAUNCH_BLOCKING": "1"})
    last = (p.stdout.strip().splitlines() or [""])[-1] if p.returncode == 0 else (p.stderr.strip().splitlines() or ["?"])[-1]
    print(" ".join(c), "->", last[:160], flush=True)
