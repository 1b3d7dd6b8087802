"""Gate before a video call: the ASA mask kernel (one and two passes) against the PyTorch reference at the recipe's
trained shape, on the GPU. Prints the share of blocks that differ; exits 1 above 2 % (bf16 ties may flip a few)."""
import sys

import torch

from sparsedistill.attention import asa_mask, asa_mask_reference

torch.manual_seed(0)
shape, block, worst = (16, 4, 8192, 64), 128, 0.0
q, k = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) * 2 for _ in range(2))
ref = asa_mask_reference(q, k, block)
for passes in (1, 2):
    got = asa_mask(q, k, block, passes=passes).to_block_bool()
    differ = (got != ref).float().mean().item()
    worst = max(worst, differ)
    print(f"passes={passes}: {differ:.4%} of blocks differ, kept {got.float().mean():.3f} vs reference {ref.float().mean():.3f}")
sys.exit(0 if worst < 0.02 else 1)
