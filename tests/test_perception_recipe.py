"""The DSRC recipe end to end on the CPU at a tiny size (a pipeline check: the numbers are not claims)."""

import json

import pytest

from sparsedistill.config import load_config
from sparsedistill.recipes.dsrc import DSRCConfig, run_dsrc, validate


def _cfg(**over):
    sets = ["sim.train_frames=4", "sim.test_frames=2", "sim.azimuths=256", "train.steps=3", "train.checkpoint_every=2",
            "train.log_every=1", 'variants=["b0", "dsrc", "dsrc_no_paint"]', 'eval.corruptions=["fog"]', "eval.levels=[2]",
            "eval.bootstrap=20", *[f"{k}={v}" for k, v in over.items()]]
    return load_config(DSRCConfig, "short", sets, recipe="perception")


def test_dsrc_recipe_runs_resumes_and_reports(tmp_path):
    from sparsedistill.cli import main

    cfg = _cfg()
    report = run_dsrc(cfg, tmp_path / "run", progress=False)
    res = json.loads((tmp_path / "run" / "results" / "eval-s0.json").read_text())
    assert res["conditions"] == ["clean", "fog-2"] and list(res["models"]) == ["b0", "dsrc", "dsrc_no_paint"]
    for name, rows in res["models"].items():
        assert 0 <= rows["clean"]["ap50"] <= 1 and 0 <= rows["fog-2"]["ap70"] <= 1
        assert ("delta_ap50_vs_b0" in rows["clean"]) == (name != "b0")
    done = sorted(p.stem for p in (tmp_path / "run" / "results").glob("*.json"))
    assert done == ["b0-s0", "detect-b0-s0", "detect-dsrc-s0", "detect-dsrc_no_paint-s0", "dsrc-s0", "dsrc_no_paint-s0",
                    "eval-s0", "teacher-s0", "teacher_unpainted-s0"]
    assert json.loads((tmp_path / "run" / "results" / "dsrc-s0.json").read_text())["layout"] == "nhwc"  # the default
    detect = json.loads((tmp_path / "run" / "results" / "detect-dsrc-s0.json").read_text())
    assert set(detect["seconds_split"]) == {"inputs", "predict", "match"}
    assert 0 < sum(detect["seconds_split"].values()) <= detect["seconds"] + 0.01  # where a detect job's time went
    assert detect["ap"]["fog-2"] == {k: v for k, v in res["models"]["dsrc"]["fog-2"].items() if k.startswith("ap")}
    logged = {json.loads(line)["job"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()}
    assert {"teacher-s0", "dsrc-s0"} <= logged
    dsrc_terms = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
                  if json.loads(line)["job"] == "dsrc-s0"]
    assert {"before_fusion", "after_fusion", "head", "occupancy", "offset"} <= set(dsrc_terms[-1])  # every DSRC term trained
    text = report.read_text()
    assert "| `dsrc` |" in text and (tmp_path / "run" / "ap-vs-severity.png").exists()
    assert "Command: `" in text and "commit " in text  # where the numbers came from
    assert list((tmp_path / "run" / "samples").glob("bev-dsrc-fog-2-f0-s0.png"))
    # resuming a finished run trains nothing; the report command rewrites the report
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    run_dsrc(cfg, tmp_path / "run", resume=True, progress=False)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
    report.unlink()
    assert main(["perception", "report", str(tmp_path / "run")]) == 0 and report.exists()
    # every job is a function of its config alone: DSRC's student, its detections and the evaluation redone after the
    # jobs before them were loaded (not trained) in this process come out the same to the last digit
    from _helpers import redo_jobs

    before, after = redo_jobs(tmp_path / "run", ["dsrc-s0", "detect-dsrc-s0", "eval-s0"],
                              lambda: run_dsrc(cfg, tmp_path / "run", resume=True, progress=False))
    assert after == before


def test_dsrc_run_carries_across_machines_as_results_detections_and_exports(tmp_path):
    """What comes back from a GPU machine (results, detect files, bf16 exports; no model checkpoints, no frames)
    evaluates anywhere; a model without detections detects from its export; detections of other frames are refused."""
    import shutil

    import torch

    cfg = _cfg()
    run_dsrc(cfg, tmp_path / "run", progress=False)
    full = json.loads((tmp_path / "run" / "results" / "eval-s0.json").read_text())
    back = tmp_path / "back"
    shutil.copytree(tmp_path / "run", back, ignore=lambda d, names: [
        n for n in names if n == "frames" or (d.endswith("checkpoints") and not n.startswith("detect-"))])
    assert sorted(p.name for p in (back / "exports").iterdir()) == [
        "b0-s0.safetensors", "dsrc-s0.safetensors", "dsrc_no_paint-s0.safetensors", "teacher-s0.safetensors",
        "teacher_unpainted-s0.safetensors"]
    (back / "results" / "eval-s0.json").unlink()
    run_dsrc(cfg, back, resume=True, progress=False)
    assert json.loads((back / "results" / "eval-s0.json").read_text()) == full  # from the detect files alone
    assert not (back / "frames").exists()  # no frame simulated, no model loaded
    # the matched predictions alone (what a session keeps in git: no detections, no checkpoints, no exports)
    kept = tmp_path / "kept"
    shutil.copytree(tmp_path / "run", kept, ignore=lambda d, names: [
        n for n in names if n in ("frames", "checkpoints", "exports") or n == "eval-s0.json"])
    run_dsrc(cfg, kept, resume=True, progress=False)
    assert json.loads((kept / "results" / "eval-s0.json").read_text()) == full
    # detect files from before the matches existed: a --jobs run (what a bank is made from) writes their matches,
    # the evaluation too, the same ones
    shutil.rmtree(back / "matches")
    run_dsrc(cfg, back, resume=True, progress=False, jobs=["b0"])
    assert [p.name for p in (back / "matches").iterdir()] == ["detect-b0-s0.npz"]
    (back / "results" / "eval-s0.json").unlink()
    run_dsrc(cfg, back, resume=True, progress=False)
    assert json.loads((back / "results" / "eval-s0.json").read_text()) == full
    assert sorted(p.name for p in (back / "matches").iterdir()) == sorted(p.name for p in (kept / "matches").iterdir())
    # a model whose detections did not come back detects again from its bf16 export
    (back / "results" / "eval-s0.json").unlink()
    (back / "results" / "detect-dsrc-s0.json").unlink()
    logged = (back / "metrics.jsonl").read_text()
    run_dsrc(cfg, back, resume=True, progress=False)
    assert (back / "metrics.jsonl").read_text() == logged  # nothing trained
    again = json.loads((back / "results" / "eval-s0.json").read_text())
    assert list(again["models"]) == list(full["models"]) and (back / "frames").exists()
    # detections made on other frames than b0's cannot be paired: a clear error, not a wrong delta
    (back / "results" / "eval-s0.json").unlink()
    state = torch.load(back / "checkpoints" / "detect-dsrc-s0.pt", weights_only=False)
    res = json.loads((back / "results" / "detect-dsrc-s0.json").read_text())
    res["truth_sha256"] = "0" * 64
    (back / "results" / "detect-dsrc-s0.json").write_text(json.dumps(res))
    with pytest.raises(ValueError, match="different test frames"):
        run_dsrc(cfg, back, resume=True, progress=False)
    assert state["truth"][0].shape[1] == 5


def test_dsrc_jobs_in_one_process_share_inputs_by_kind_and_outlive_a_failed_job(tmp_path, monkeypatch):
    """Jobs taken in turn by one process keep collated inputs per kind (early fusion's are not b0's: early trained
    after b0 equals early trained alone), and a failed teacher stops only its students."""
    import torch

    from sparsedistill.recipes import dsrc

    cfg = _cfg(variants='["b0", "early", "dsrc"]')
    run_dsrc(cfg, tmp_path / "after_b0", progress=False, jobs=["b0", "early"])
    run_dsrc(cfg, tmp_path / "alone", progress=False, jobs=["early"])
    weights = [torch.load(tmp_path / d / "checkpoints" / "early-s0.pt", weights_only=False)["model"]
               for d in ("after_b0", "alone")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert json.loads((tmp_path / "after_b0" / "results" / "detect-early-s0.json").read_text())["ap"] == \
        json.loads((tmp_path / "alone" / "results" / "detect-early-s0.json").read_text())["ap"]

    # b0 before the teacher collates each frame once, with the teacher's input for the later job, and trains as alone
    calls = []

    def counted(frame, *args, **kw):
        calls.append(kw.get("teacher"))
        return frame_inputs(frame, *args, **kw)

    frame_inputs = dsrc.frame_inputs
    monkeypatch.setattr(dsrc, "frame_inputs", counted)
    run_dsrc(cfg, tmp_path / "b0_then_teacher", progress=False, jobs=["b0", "teacher"])
    monkeypatch.setattr(dsrc, "frame_inputs", frame_inputs)
    assert 0 < len(calls) <= cfg.sim.train_frames and all(calls)
    run_dsrc(cfg, tmp_path / "b0_alone", progress=False, jobs=["b0"])
    weights = [torch.load(tmp_path / d / "checkpoints" / "b0-s0.pt", weights_only=False)["model"]
               for d in ("b0_then_teacher", "b0_alone")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

    def out_of_memory(self, seed, painted=True):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(dsrc.DSRCRecipe, "teacher", out_of_memory)
    run = tmp_path / "failing"
    with pytest.raises(RuntimeError, match=r"2 jobs failed.*teacher-s0: OutOfMemoryError.*dsrc-s0: its teacher"):
        run_dsrc(cfg, run, progress=False, jobs=["teacher", "dsrc", "b0"])
    assert (run / "matches" / "detect-b0-s0.npz").exists() and not (run / "results" / "dsrc-s0.json").exists()


def test_dsrc_jobs_keep_of_the_collated_inputs_what_later_jobs_use(tmp_path):
    import torch

    from sparsedistill.perception.batching import FrameInputs
    from sparsedistill.recipes.dsrc import DSRCRecipe
    from sparsedistill.runs import Run

    cfg = _cfg(variants='["b0", "early", "dsrc", "dsrc_no_distill"]')
    recipe = DSRCRecipe(cfg, Run(tmp_path / "run", cfg), progress=False)
    one = torch.zeros(1)

    def part():
        return FrameInputs([one], one, teacher_clouds=[one], object_cells=one, occupied_cells=one, occupied_offsets=one)

    recipe._kept = {"intermediate": {0: part()}, "early": {0: part()}}
    recipe._keep_inputs_for(["teacher", "dsrc", "dsrc_no_distill", "b0"])
    assert recipe._teacher_input_later and set(recipe._kept) == {"intermediate"}
    kept = recipe._kept["intermediate"][0]
    assert kept.teacher_clouds is not None and kept.occupied_cells is not None
    recipe._keep_inputs_for(["dsrc_no_distill", "b0"])  # the reconstruction targets stay, the teacher's input goes
    assert not recipe._teacher_input_later and kept.teacher_clouds is None and kept.object_cells is None
    assert kept.occupied_cells is not None
    recipe._keep_inputs_for(["b0"])
    assert kept.occupied_cells is None and kept.occupied_offsets is None and kept.clouds == [one]
    recipe._keep_inputs_for([])
    assert recipe._kept == {}
    # what is still to train counts, for the seeds to come too; a finished job needs no inputs
    assert recipe._untrained(["b0", "teacher", "dsrc"], 1, 0) == ["teacher", "dsrc"]
    recipe.run.save_result("teacher-s0", {"steps": 3})
    assert recipe._untrained(["b0", "teacher", "dsrc"], 1, 0) == ["dsrc"]


def test_dsrc_recipe_rejects_bad_configs():
    with pytest.raises(ValueError, match="unknown variants"):
        validate(_cfg(variants='["b0", "dsrc_plus"]'))
    with pytest.raises(ValueError, match="must include b0"):
        validate(_cfg(variants='["dsrc"]'))
    with pytest.raises(ValueError, match="unknown corruptions"):
        validate(_cfg(**{"eval.corruptions": '["rain"]'}))
    with pytest.raises(ValueError, match=r"unknown corruptions \['haze'\] \(eval.corruptions / eval.pictures\)"):
        validate(_cfg(**{"eval.pictures": '["haze"]'}))
    with pytest.raises(ValueError, match="eval.levels"):
        validate(_cfg(**{"eval.levels": "[4]"}))
    with pytest.raises(ValueError, match="not a cooperative detector"):
        validate(_cfg(model='"mlp"'))


def test_perception_simulate_draws_frames(tmp_path, capsys):
    from sparsedistill.cli import main

    assert main(["perception", "simulate", "--out", str(tmp_path), "--frames", "1", "--corruptions", "snow",
                 "--speed-frames", "1"]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["frame-2000000-clean.png", "frame-2000000-snow-2.png"]
    assert "frames/s on cpu" in capsys.readouterr().out


def test_dsrc_jobs_train_apart_in_one_run_directory(tmp_path, capsys):
    """`perception train --jobs`: processes sharing a run directory each train their jobs; `perception evaluate` or a
    last run evaluates without retraining."""
    from sparsedistill.cli import main

    cfg, run = _cfg(), tmp_path / "run"
    with pytest.raises(RuntimeError, match="train it first"):
        run_dsrc(cfg, run, resume=True, progress=False, jobs=["dsrc"])
    with pytest.raises(ValueError, match="unknown jobs"):
        run_dsrc(cfg, run, resume=True, progress=False, jobs=["early"])  # not among this config's variants
    sets = [a for s in ["sim.train_frames=4", "sim.test_frames=2", "sim.azimuths=256", "train.steps=3",
                        "train.checkpoint_every=2", "train.log_every=1", 'variants=["b0", "dsrc", "dsrc_no_paint"]',
                        'eval.corruptions=["fog"]', "eval.levels=[2]", "eval.bootstrap=20"] for a in ("--set", s)]
    assert main(["perception", "train", "--config", "short", "--run-dir", str(run), "--resume", "--no-progress",
                 *sets, "--jobs", "teacher", "b0"]) == 0
    assert "trained teacher, b0; `perception evaluate`" in capsys.readouterr().out
    done = sorted(p.stem for p in (run / "results").glob("*.json"))
    assert done == ["b0-s0", "detect-b0-s0", "teacher-s0"] and not (run / "report.md").exists()  # b0 detected too
    assert run_dsrc(cfg, run, resume=True, progress=False, jobs=["dsrc"]) is None
    trained = (run / "metrics.jsonl").read_text()
    # --evaluate-only trains nothing: the report of the models detected so far, saying which are missing, and no
    # finished evaluation saved (the full one comes once every model is detected)
    assert main(["perception", "evaluate", "--run-dir", str(run), "--no-progress"]) == 0  # the run's own config
    assert "**Partial report: models not yet detected**: seed 0: `dsrc_no_paint`." in capsys.readouterr().out
    text = (run / "report.md").read_text()
    assert "| `dsrc` |" in text and "| `dsrc_no_paint` |" not in text
    assert not (run / "results" / "eval-s0.json").exists() and (run / "metrics.jsonl").read_text() == trained
    for jobs in (["b0"], []):  # [] is every job
        with pytest.raises(ValueError, match="pass one of them"):
            run_dsrc(cfg, run, resume=True, progress=False, jobs=jobs, evaluate_only=True)
    with pytest.raises(FileNotFoundError, match="holds no run"):
        run_dsrc(cfg, tmp_path / "empty", progress=False, evaluate_only=True)
    assert not (tmp_path / "empty").exists()  # nothing left behind for a later --resume to pick up
    import shutil

    shutil.copytree(run, tmp_path / "no-b0", ignore=lambda d, names: [n for n in names if "b0" in n])
    with pytest.raises(FileNotFoundError, match="no seed with b0 detected"):
        run_dsrc(cfg, tmp_path / "no-b0", resume=True, progress=False, evaluate_only=True)
    detected = (run / "results" / "detect-b0-s0.json").stat().st_mtime_ns
    # a run carried on from its bank (results and matches of the detected models, no weights): a listed teacher
    # whose variants are all detected is not trained again
    bank = tmp_path / "bank"
    shutil.copytree(run, bank, ignore=lambda d, names: [n for n in names if n in ("frames", "checkpoints", "exports")
                                                        or n.startswith("teacher")])
    assert run_dsrc(cfg, bank, resume=True, progress=False, jobs=["teacher", "dsrc", "b0"]) is None
    assert (bank / "metrics.jsonl").read_text() == trained and not (bank / "results" / "teacher-s0.json").exists()
    # `perception train` without --jobs trains every job not yet trained, teachers first, and evaluates nothing
    assert main(["perception", "train", "--config", "short", "--run-dir", str(run), "--resume", "--no-progress",
                 *sets]) == 0
    assert not (run / "results" / "eval-s0.json").exists() and (run / "results" / "detect-dsrc_no_paint-s0.json").exists()
    report = run_dsrc(cfg, run, resume=True, progress=False)
    assert (run / "results" / "detect-b0-s0.json").stat().st_mtime_ns == detected  # its detections were reused
    assert report.exists() and (run / "results" / "eval-s0.json").exists()
    after = (run / "metrics.jsonl").read_text()
    assert after.startswith(trained)  # the trained jobs were loaded, not trained again
    assert {json.loads(line)["job"] for line in after[len(trained):].splitlines()} == {"teacher_unpainted-s0",
                                                                                       "dsrc_no_paint-s0"}
    full = (run / "results" / "eval-s0.json").read_text()
    assert "Partial" not in run_dsrc(cfg, run, resume=True, progress=False, evaluate_only=True).read_text()
    assert (run / "results" / "eval-s0.json").read_text() == full
    # a finished evaluation is reported as it is, whether or not the matches it was made from are here
    shutil.copytree(run, tmp_path / "evaluated", ignore=lambda d, names: [n for n in names
                                                                          if n in ("matches", "checkpoints", "frames")])
    text = run_dsrc(cfg, tmp_path / "evaluated", resume=True, progress=False, evaluate_only=True).read_text()
    assert "Partial" not in text and "| `dsrc_no_paint` |" in text


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_train_precision_bf16_runs_the_forwards_under_autocast(tmp_path, monkeypatch, precision):
    import torch

    from sparsedistill.recipes import dsrc as recipe
    from sparsedistill.runs import Run

    seen = []

    class Probe(torch.nn.Module):  # stands in for the detector: records whether autocast is on, then stops
        def forward(self, *args):
            seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
            raise KeyboardInterrupt

    def one_call(model, loss_fn, get_batch, *args, **kwargs):
        with pytest.raises(KeyboardInterrupt):
            loss_fn(Probe(), get_batch(torch.tensor([0])))
        raise RuntimeError("probed")

    monkeypatch.setattr(recipe, "train", one_call)
    cfg = _cfg(**{"train.precision": f'"{precision}"'})
    dsrc = recipe.DSRCRecipe(cfg, Run(tmp_path / "run", cfg), progress=False)
    with pytest.raises(RuntimeError, match="probed"):
        dsrc.variant("b0", 0, {})
    assert seen == [precision == "bf16"]
    with pytest.raises(ValueError, match="train.precision"):
        validate(_cfg(**{"train.precision": '"fp16"'}))


def test_report_rows_span_the_seeds_that_have_each_model(tmp_path):
    """The extra seeds may train b0 and dsrc alone (the ablations under the first seed): each row averages the
    seeds that have its model and says how many."""
    from sparsedistill.recipes.dsrc_report import write_report
    from sparsedistill.runs import Run

    def evaluation(models: dict[str, float]) -> dict:
        rows = {}
        for m, ap in models.items():
            rows[m] = {"clean": {"ap50": ap, "ap70": ap / 2}, "fog-2": {"ap50": ap - 0.1, "ap70": ap / 4},
                       "mce_ap50": 1.0, "mrr_ap50": 0.9}
            if m != "b0":
                rows[m]["clean"]["delta_ap50_vs_b0"] = [0.01, -0.02, 0.04]
        return {"conditions": ["clean", "fog-2"], "models": rows}

    run = Run(tmp_path / "run", _cfg())
    write_report(run, {0: evaluation({"b0": 0.5, "dsrc": 0.7, "dsrc_no_paint": 0.6}),
                       1: evaluation({"b0": 0.6, "dsrc": 0.8})})
    text = (tmp_path / "run" / "report.md").read_text()
    assert "| `dsrc` | 2 | 75.0 ± 7.1 | 37.5 ± 3.5 |" in text
    assert "| `dsrc_no_paint` | 1 | 60.0 | 30.0 | 50.0 |" in text
    assert "| `b0` | 2 | 55.0 ± 7.1 |" in text
    assert "| +1.0 [-2.0, +4.0] (seed 0) |" in text  # no matches here: the first seed's delta, said so
    with pytest.raises(ValueError, match="no evaluation"):
        write_report(run, {})


def _matches(found: list[int], scores: list[float]):
    """A model's matches on four frames of one car each, found (1) or missed (0), by condition and threshold."""
    import torch

    from sparsedistill.perception.detections import IOU_THRESHOLDS
    from sparsedistill.perception.metrics import FrameMatches

    m = FrameMatches.from_frames(torch.tensor(scores, dtype=torch.float32), torch.tensor(found, dtype=torch.uint8),
                                 torch.ones(4, dtype=torch.int32), torch.ones(4, dtype=torch.int32))
    return {key: {t: m for t in IOU_THRESHOLDS} for key in ("clean", "fog-2")}


def test_perception_report_merges_the_seeds_of_several_runs(tmp_path, capsys):
    """Seed 0 with every model in one run, seed 1 with b0 and dsrc in another: one report over both, written where
    asked, the pictures of both linked, dsrc's delta vs b0 over both seeds' matches; a seed evaluated twice is
    refused."""
    from sparsedistill.cli import main
    from sparsedistill.perception.detections import save_matches
    from sparsedistill.perception.metrics import paired_bootstrap_delta_seeds
    from sparsedistill.runs import Run

    def evaluated(path, seed: int, models: dict[str, float]) -> None:
        Run(path, _cfg(), command=f"perception run seed {seed}")
        rows = {m: {"clean": {"ap50": ap, "ap70": ap / 2}, "fog-2": {"ap50": ap - 0.1, "ap70": ap / 4},
                    "mce_ap50": 1.0, "mrr_ap50": 0.9} for m, ap in models.items()}
        (path / "results" / f"eval-s{seed}.json").write_text(json.dumps({"conditions": ["clean", "fog-2"], "models": rows}))

    evaluated(tmp_path / "s0", 0, {"b0": 0.5, "dsrc": 0.7, "dsrc_no_paint": 0.6})
    evaluated(tmp_path / "s1", 1, {"b0": 0.6, "dsrc": 0.8})
    matches = {0: {"b0": _matches([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.6]), "dsrc": _matches([1, 1, 1, 0], [0.9, 0.8, 0.7, 0.6])},
               1: {"b0": _matches([0, 1, 1, 0], [0.9, 0.8, 0.7, 0.6]), "dsrc": _matches([1, 1, 0, 1], [0.9, 0.8, 0.7, 0.6])}}
    for seed in (0, 1):
        (tmp_path / f"s{seed}" / "samples").mkdir()
        (tmp_path / f"s{seed}" / "samples" / f"bev-dsrc-clean-f0-s{seed}.png").write_bytes(b"png")
        (tmp_path / f"s{seed}" / "matches").mkdir()
        for m in ("b0", "dsrc"):
            save_matches(tmp_path / f"s{seed}" / "matches" / f"detect-{m}-s{seed}.npz", matches[seed][m])
            (tmp_path / f"s{seed}" / "results" / f"detect-{m}-s{seed}.json").write_text(json.dumps({"truth_sha256": "a"}))
    out = tmp_path / "merged"
    assert main(["perception", "report", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(out)]) == 0
    assert "| `dsrc` | 2 | 75.0 ± 7.1 |" in capsys.readouterr().out
    text = (out / "report.md").read_text()
    assert "(2 seeds: [0, 1])" in text and "Seed 1 from [`../s1`](../s1): Command: `perception run seed 1`" in text
    for key, end in (("clean", " |"), ("fog-2", ") |")):  # the clean column, and the per-corruption table's cell
        pairs = [(matches[seed]["dsrc"][key]["ap50"], matches[seed]["b0"][key]["ap50"]) for seed in (0, 1)]
        d, low, high = paired_bootstrap_delta_seeds(pairs, rounds=20)  # _cfg's eval.bootstrap
        cell = f"{d * 100:+.1f} [{low * 100:+.1f}, {high * 100:+.1f}]" + (" (2 seeds)" if key == "clean" else "")
        assert cell + end in text, cell
    # seeds whose detect jobs saw other test frames are not pooled: the first seed's delta (none stored here: "—")
    (tmp_path / "s1" / "results" / "detect-b0-s1.json").write_text(json.dumps({"truth_sha256": "b"}))
    assert main(["perception", "report", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(out)]) == 0
    assert "(2 seeds)" not in (out / "report.md").read_text()
    (tmp_path / "s1" / "results" / "detect-b0-s1.json").write_text(json.dumps({"truth_sha256": "a"}))
    assert "![bev-dsrc-clean-f0-s0.png](../s0/samples/bev-dsrc-clean-f0-s0.png)" in text
    assert "![bev-dsrc-clean-f0-s1.png](../s1/samples/bev-dsrc-clean-f0-s1.png)" in text
    assert (out / "ap-vs-severity.png").exists() and not (tmp_path / "s0" / "report.md").exists()
    evaluated(tmp_path / "again", 1, {"b0": 0.6, "dsrc": 0.8})
    assert main(["perception", "report", str(tmp_path / "s0"), str(tmp_path / "s1"), str(tmp_path / "again")]) != 0
    assert "seed 1 is evaluated in both" in capsys.readouterr().err
    Run(tmp_path / "none", _cfg())
    assert main(["perception", "report", str(tmp_path / "none")]) != 0
    assert "has no finished evaluation yet" in capsys.readouterr().err
    # seeds of other experiments (here: other corruptions) are not averaged together; a run named twice counts once
    Run(tmp_path / "snowy", _cfg(**{"eval.corruptions": '["snow"]'}))
    assert main(["perception", "report", str(tmp_path / "s0"), str(tmp_path / "snowy")]) != 0
    err = capsys.readouterr().err
    assert "differs from" in err and "in eval.corruptions:" in err
    assert main(["perception", "report", str(tmp_path / "s1"), str(tmp_path / "s1"), "--out", str(out)]) == 0


def test_dsrc_recipe_under_torchrun_two_processes(tmp_path):
    """Teachers and variants train data-parallel (gloo, CPU); rank 0 alone detects and evaluates while the other
    waits (a detect job that synchronised inside rank 0's work hung the run)."""
    import subprocess
    import sys

    sets = ["sim.train_frames=4", "sim.test_frames=2", "sim.azimuths=256", "train.steps=2", "train.checkpoint_every=2",
            "train.log_every=1", 'variants=["b0", "dsrc"]', 'eval.corruptions=["fog"]', "eval.levels=[2]",
            "eval.bootstrap=10"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "sparsedistill",
           "perception", "run", "--config", "short", "--run-dir", str(tmp_path / "run"), "--no-progress",
           *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    res = json.loads((tmp_path / "run" / "results" / "eval-s0.json").read_text())
    assert list(res["models"]) == ["b0", "dsrc"]
    # --jobs processes too: a variant detects on rank 0 while rank 1 waits
    (tmp_path / "run" / "results" / "eval-s0.json").unlink()
    (tmp_path / "run" / "results" / "detect-dsrc-s0.json").unlink()
    proc = subprocess.run(cmd + ["--resume", "--jobs", "dsrc"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert (tmp_path / "run" / "results" / "detect-dsrc-s0.json").exists()


def test_device_script_trains_only_the_jobs_asked_and_returns_their_bank(tmp_path):
    """benchmarks/device/dsrc_run.sh at the tiny size on the CPU: with JOBS a part of the variants it trains those
    alone (its evaluation step once trained the rest: ~6 minutes of a GPU call), writes the partial report, and
    returns the bank (results and matches, no weights)."""
    import os
    import subprocess
    import sys
    import tarfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sets = [a for s in ["sim.train_frames=4", "sim.test_frames=2", "sim.azimuths=256", "train.steps=3",
                        'variants=["b0", "dsrc"]', 'eval.corruptions=["fog"]', "eval.levels=[2]",
                        "eval.bootstrap=20"] for a in ("--set", s)]
    out, run = tmp_path / "out", tmp_path / "runs" / "dsrc-tiny"
    out.mkdir()
    inherited = {k: v for k, v in os.environ.items() if k not in ("BANK", "EVALUATE", "JOBS", "RUN", "OUT")}
    env = {**inherited, "RUN": str(run), "JOBS": "b0", "OUT": str(out),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": f"{root / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(["bash", str(root / "benchmarks/device/dsrc_run.sh"), "300", "--config", "short", *sets],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "evaluation" not in done.stdout and not (run / "report.md").exists()  # the bank evaluates anywhere
    jobs = {json.loads(line)["job"] for line in (run / "metrics.jsonl").read_text().splitlines()}
    assert jobs == {"b0-s0"}  # neither the teacher nor dsrc
    again = subprocess.run(["bash", str(root / "benchmarks/device/dsrc_run.sh"), "300", "--config", "short", *sets],
                           cwd=tmp_path, env={**env, "EVALUATE": "1"}, capture_output=True, text=True, timeout=600)
    assert "evaluation: exit 0" in again.stdout, again.stdout[-2000:] + again.stderr[-2000:]
    assert {json.loads(line)["job"] for line in (run / "metrics.jsonl").read_text().splitlines()} == jobs
    assert "**Partial report: models not yet detected**: seed 0: `dsrc`." in (run / "report.md").read_text()
    with tarfile.open(out / "dsrc-tiny.tgz") as tar:
        names = tar.getnames()
    assert any(n.endswith("matches/detect-b0-s0.npz") for n in names)
    assert not any(n.endswith((".pt", ".safetensors")) or "/frames" in n for n in names)


@pytest.mark.parametrize("channels_last", [True, False])
def test_recipe_models_take_the_configured_memory_layout(tmp_path, channels_last):
    """NHWC by default (cuDNN's layout on tensor cores, faster on the H100); train.channels_last=false keeps NCHW."""
    import torch

    from sparsedistill.recipes import dsrc as recipe
    from sparsedistill.runs import Run

    cfg = _cfg(**{"train.channels_last": str(channels_last).lower()})
    dsrc = recipe.DSRCRecipe(cfg, Run(tmp_path / "run", cfg), progress=False)
    convs = [p for p in dsrc._model(in_features=5).parameters() if p.ndim == 4]
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert convs and all(p.is_contiguous(memory_format=layout) for p in convs)
    # a 1x1 kernel is both layouts at once: the 3x3 ones tell them apart
    assert any(p.is_contiguous(memory_format=torch.channels_last) != p.is_contiguous() for p in convs)
    assert recipe.DSRCConfig().train.channels_last
