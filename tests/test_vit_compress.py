import json
import subprocess
import sys

import torch

from sparsedistill.data.augment import random_crop_flip
from sparsedistill.models import create_model
from sparsedistill.recipes.vit_compress import permute_for_24
from sparsedistill.weights import kept_magnitude


def test_crop_flip_is_reproducible_and_keeps_shapes():
    x = torch.rand(16, 1, 28, 28)
    a = random_crop_flip(x, torch.Generator().manual_seed(3))
    b = random_crop_flip(x, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)
    assert torch.equal(random_crop_flip(x, torch.Generator(), pad=0, flip=False), x)
    # a crop only moves pixels: each output image's pixels are a subset of its zero-padded input's
    assert (a.sum((1, 2, 3)) <= x.sum((1, 2, 3)) + 1e-4).all()


def test_permutations_keep_the_function_and_raise_the_kept_magnitude():
    torch.manual_seed(0)
    model = create_model("vit_fmnist_micro", depth=2).eval()
    x = torch.rand(4, 1, 28, 28)
    before = {n: float(kept_magnitude(m.weight)) for n, m in model.named_modules() if n.endswith(("fc2", "attn.proj"))}
    with torch.no_grad():
        ref = model(x)
        stats = permute_for_24(model, ["qkv", "proj", "fc1", "fc2"], rounds=200, seed=0)
        out = model(x)
    assert torch.allclose(out, ref, atol=1e-5)
    after = {n: float(kept_magnitude(m.weight)) for n, m in model.named_modules() if n in before}
    assert all(after[n] > before[n] for n in before)
    assert set(stats) == {"fc2", "proj"} and all(a > b for b, a in zip(stats["fc2"][0::2], stats["fc2"][1::2]))


def test_vit_compress_cli_end_to_end_and_resume(tmp_path):
    """The whole pipeline on real Fashion-MNIST at toy scale: every job, the exports, the report, a resume."""
    run = tmp_path / "run"
    sets = ["seeds=[0]", "data.train_subset=512", "data.test_subset=200", "model.name=vit_fmnist_micro",
            "teacher.steps=12", "teacher.batch_size=64", "student.steps=4", "student.batch_size=32",
            "qat.train.steps=3", "qat.train.batch_size=32", "qat.calibration_batches=1", "prune.permutation_rounds=20"]
    cmd = [sys.executable, "-m", "sparsedistill.cli", "vit", "compress", "--run-dir", str(run), "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "2:4 INT8, unsupervised KD + QAT" in out.stdout and "No CUDA GPU" in out.stdout
    jobs = {p.stem for p in (run / "results").glob("*.json")}
    assert jobs == {"teacher-s0", "prune-s0", "sparse-full-s0", "sparse-ce-s0", "sparse-logits-s0", "sparse-unsup-s0",
                    "qat-int8-s0", "qat-fp8-s0", "qat-int8-unsup-s0"}
    res = json.loads((run / "results" / "qat-int8-s0.json").read_text())
    assert res["deployed"]["agreement_with_training_graph"] > 0.97 and res["deployed"]["bytes"]["index"] > 0
    # the int8 students also run with fc1 -> GELU -> int8 fused (the epilogue's arithmetic, dense on the CPU)
    assert res["deployed"]["agreement_fused_mlp"] > 0.97
    assert abs(res["deployed"]["test_acc_fused_mlp"] - res["deployed"]["test_acc"]) <= 0.02
    assert "test_acc_fused_mlp" not in json.loads((run / "results" / "qat-fp8-s0.json").read_text())["deployed"]
    unsup = json.loads((run / "results" / "sparse-unsup-s0.json").read_text())
    assert unsup["kd"]["ce"] == 0
    report = (run / "report.md").read_text()
    assert "What each KD term adds" in report and (run / "accuracy.png").stat().st_size > 1000
    assert "With each MLP's fc1 -> GELU -> int8 fused" in report
    # the exported file runs on its own
    ev = subprocess.run([sys.executable, "-m", "sparsedistill.cli", "vit", "evaluate", str(run / "exports" / "qat-int8-s0.safetensors"),
                         "--test-subset", "200"], capture_output=True, text=True, timeout=300)
    assert ev.returncode == 0 and "top-1" in ev.stdout, ev.stderr[-2000:]
    # a resume with the same config finds every job done and rewrites the same table
    again = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.splitlines()[:6] == out.stdout.splitlines()[:6]
    # every job is a function of its config alone: redone in a fresh process (the jobs before it loaded from their
    # checkpoints, not trained in the same process), the students come out the same to the last digit
    redo = ["sparse-unsup-s0", "qat-int8-s0", "qat-fp8-s0", "qat-int8-unsup-s0"]
    before = {j: json.loads((run / "results" / f"{j}.json").read_text()) for j in redo}
    for j in redo:
        (run / "results" / f"{j}.json").unlink()
        (run / "checkpoints" / f"{j}.pt").unlink()
    third = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-2000:]
    for j in redo:
        after = json.loads((run / "results" / f"{j}.json").read_text())
        assert after["test_acc"] == before[j]["test_acc"] and after["test_nll"] == before[j]["test_nll"], j
        assert after["deployed"]["test_acc"] == before[j]["deployed"]["test_acc"], j
