"""Bounded load test of `sparsedistill retrieval serve` on loopback: throughput and latency under concurrent clients.

Starts the service in a subprocess (uvicorn, one process, access log off) over a copy of a SciFact
index built by ``sparsedistill retrieval index`` (SPLADE-tiny documents), checks that the service
returns what the index returns in-process for every test query (and their NDCG@10), then runs
``--clients`` threads, each with its own keep-alive ``httpx.Client``, sending SciFact's 300 test
queries round-robin (``POST /search``, k=10) for ``--duration`` seconds after a short warm-up.
Latency is measured by the client (request sent to response parsed); the service's own ``took_ms``
(query encoding + search) is recorded beside it. Clients and server share this machine's cores, so
the figures are for the pair, not for the server alone; CPU seconds of each are recorded.

    sparsedistill retrieval index --collection scifact --index-dir /tmp/ix-scifact   # ~9 min on 2 CPU cores
    python benchmarks/retrieval_service_load.py --index /tmp/ix-scifact
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from importlib.metadata import version
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from sparsedistill.data.beir import load_beir  # noqa: E402
from sparsedistill.runs import environment  # noqa: E402


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]  # nearest rank


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def ndcg10(ranked: list[str], rels: dict[str, int]) -> float:
    dcg = sum(rels.get(d, 0) / math.log2(i + 2) for i, d in enumerate(ranked[:10]))
    ideal = sum(g / math.log2(i + 2) for i, g in enumerate(sorted(rels.values(), reverse=True)[:10]))
    return dcg / ideal if ideal else 0.0


def prepare_index(source: Path, collection: str, work: Path) -> Path:
    """A private copy of the index files (the service may be pointed at writes; the source stays untouched)."""
    if not (source / "manifest.json").exists():
        from sparsedistill.retrieval.collection import build_collection_index

        print(f"{source} holds no index: encoding {collection} with SPLADE-tiny (resumable; ~9 minutes for SciFact on 2 cores)")
        build_collection_index(collection, source).close()
    dest = work / "ix"
    dest.mkdir()
    for f in source.iterdir():
        if f.is_file() and (f.name in ("manifest.json", "idf.json") or f.name.startswith("seg-")):
            shutil.copy2(f, dest / f.name)
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--index", type=Path, default=Path("/tmp/ix-scifact"), help="index built by `retrieval index` (built here if absent)")
    p.add_argument("--collection", default="scifact")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--duration", type=float, default=20.0, help="seconds of measured load")
    p.add_argument("--warmup", type=float, default=2.0)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "retrieval_service_load.json")
    args = p.parse_args()

    col = load_beir(args.collection)
    qids = list(col.judged_queries())
    queries = [col.queries[q] for q in qids]
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="svc-load-") as tmp:
        index_dir = prepare_index(args.index, args.collection, Path(tmp))
        port = free_port()
        cmd = [sys.executable, "-m", "sparsedistill.cli", "retrieval", "serve", "--index-dir", str(index_dir),
               "--port", str(port), "--log-level", "warning", "--no-access-log"]
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        t_start = time.perf_counter()
        server = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        base = f"http://127.0.0.1:{port}"
        try:
            while True:
                if server.poll() is not None:
                    raise SystemExit(f"the service exited ({server.returncode}):\n{server.stdout.read()}")
                try:
                    health = httpx.get(f"{base}/health", timeout=1).json()
                    break
                except httpx.TransportError:
                    if time.perf_counter() - t_start > 120:
                        raise SystemExit("the service did not come up in 120 s")
                    time.sleep(0.1)
            startup_s = time.perf_counter() - t_start
            if health["docs"] != len(col.corpus):
                raise SystemExit(f"the index holds {health['docs']} documents, {args.collection} has {len(col.corpus)}")

            # correctness: the service against the same index searched in-process
            from sparsedistill.retrieval.collection import open_collection_index

            index, qenc, _ = open_collection_index(index_dir)
            mismatches, ndcgs = 0, []
            with httpx.Client(base_url=base, timeout=30) as c:
                for qid, q in zip(qids, queries):
                    got = [h["id"] for h in c.post("/search", json={"query": q, "k": args.k}).json()["results"]]
                    mismatches += got != [d for d, _ in index.search(qenc([q]), k=args.k)]
                    ndcgs.append(ndcg10(got, col.qrels[qid]))
            index.close()

            # load
            lat: list[float] = []
            took: list[float] = []
            errors: list[str] = []
            lock = threading.Lock()
            stop_at = time.perf_counter() + args.warmup + args.duration

            def client(n: int) -> None:
                i = n * len(queries) // args.clients  # each client starts at its own place in the query list
                mine_lat, mine_took, mine_err = [], [], []
                with httpx.Client(base_url=base, timeout=30) as c:
                    while (now := time.perf_counter()) < stop_at:
                        q = queries[i % len(queries)]
                        i += 1
                        try:
                            r = c.post("/search", json={"query": q, "k": args.k})
                            ok = r.status_code == 200 and len(r.json()["results"]) <= args.k
                            body = r.json()
                        except (httpx.HTTPError, ValueError) as e:
                            ok, body = False, {"detail": repr(e)}
                        t = time.perf_counter()
                        if now >= measure_from:
                            if ok:
                                mine_lat.append((t - now) * 1e3)
                                mine_took.append(body["took_ms"])
                            else:
                                mine_err.append(str(body.get("detail"))[:200])
                with lock:
                    lat.extend(mine_lat)
                    took.extend(mine_took)
                    errors.extend(mine_err)

            measure_from = time.perf_counter() + args.warmup
            threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
            cpu_server0, cpu_client0 = cpu_seconds(server.pid), time.process_time()
            for t in threads:
                t.start()
            time.sleep(max(0.0, measure_from - time.perf_counter()))
            cpu_server1, cpu_client1 = cpu_seconds(server.pid), time.process_time()
            for t in threads:
                t.join()
            cpu_server2, cpu_client2 = cpu_seconds(server.pid), time.process_time()
            health_after = httpx.get(f"{base}/health", timeout=5).json()
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()

    n = len(lat) + len(errors)
    result = {
        "benchmark": "retrieval_service_load",
        "command": "python " + shlex.join(sys.argv),
        "server_command": shlex.join(["python", *cmd[1:]]).replace(str(index_dir), "<copy of --index>"),
        "environment": {**environment(), "fastapi": version("fastapi"), "uvicorn": version("uvicorn"),
                        "httpx": version("httpx"), "starlette": version("starlette"), "cpu_cores": os.cpu_count(),
                        # what "+uncommitted changes" in the commit refers to (other work in the same checkout)
                        "uncommitted_tracked_files": subprocess.run(["git", "diff", "--name-only", "HEAD"], cwd=ROOT,
                                                                    capture_output=True, text=True).stdout.split(),
                        "loadavg_before": [round(x, 2) for x in load_before]},
        "index": {"source": str(args.index), "collection": args.collection, **{k: health["index"][k] for k in
                  ("docs", "postings", "segments", "bytes_on_disk")}, "metadata": health["metadata"]},
        "settings": {"clients": args.clients, "duration_s": args.duration, "warmup_s": args.warmup, "k": args.k,
                     "queries": len(queries), "client": "one httpx.Client (keep-alive) per thread, same machine",
                     "server": "one uvicorn process, default event loop and threadpool"},
        "startup_s": round(startup_s, 3),
        "correctness": {"queries": len(queries), "top_k_mismatches_vs_in_process": mismatches,
                        "ndcg@10": round(100 * statistics.fmean(ndcgs), 2)},
        "results": {
            "requests": n, "ok": len(lat), "errors": len(errors), "error_examples": sorted(set(errors))[:5],
            "throughput_rps": round(len(lat) / args.duration, 1),
            "latency_ms": {"p50": round(pct(lat, 50), 3), "p90": round(pct(lat, 90), 3), "p99": round(pct(lat, 99), 3),
                           "max": round(max(lat), 3), "mean": round(statistics.fmean(lat), 3)} if lat else None,
            "server_took_ms": {"p50": round(pct(took, 50), 3), "p99": round(pct(took, 99), 3)} if took else None,
            "cpu_s": {"server": round(cpu_server2 - cpu_server1, 2), "clients": round(cpu_client2 - cpu_client1, 2),
                      "server_warmup": round(cpu_server1 - cpu_server0, 2)},
            "docs_after": health_after["docs"],
        },
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    r = result["results"]
    print(json.dumps({"throughput_rps": r["throughput_rps"], "latency_ms": r["latency_ms"], "errors": r["errors"],
                      "server_took_ms": r["server_took_ms"], "cpu_s": r["cpu_s"], "correctness": result["correctness"]}, indent=1))
    print(f"wrote {args.out}")
    return 0 if not errors and not mismatches else 1


if __name__ == "__main__":
    sys.exit(main())
