"""A long run at moderate mixed load: memory of every server process, errors, KV usage and latency over time.

    python -m bench.soak [--minutes 30] [--clients 16] [--max-tokens 64] [--json docs/figures/soak.json]
                         [--plot docs/figures/soak.png]

Starts `tidal serve` (default mode, the shipped model) and keeps --clients client threads busy with
bench.load's mixed streams (gRPC and SSE, full, cancelled, short deadlines) for --minutes. Every
--sample-s it records the resident memory of every process of the server (the CLI and everything it
started: Ray's GCS and raylet, the Serve controller, proxy, ingress, engine replica), the KV usage the
server reports, and the p50 / p99 latency and counts of the streams that ended in that window.
RSS growth is measured from the end of the warm-up (the first tenth of the run) to the end.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import threading
import time
from pathlib import Path

import psutil

from bench.load import one_stream
from proto import tidal_pb2 as pb
from proto.channel import insecure_channel


def server_rss(root_pid: int) -> dict[str, int]:
    """RSS in bytes of `root_pid` and its descendants, summed by process name."""
    out: dict[str, int] = collections.defaultdict(int)
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    for p in procs:
        try:
            out[p.name()] += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return dict(out)


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    from bench.e2e import Server
    from proto import tidal_pb2_grpc as pbg

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/zaya-code-tiny")
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--sample-s", type=float, default=10)
    ap.add_argument("--port", type=int, default=8500)
    ap.add_argument("--json")
    ap.add_argument("--plot")
    args = ap.parse_args()
    server = Server("tidal", args.model, args.port)
    log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / "tidal-soak"
    log_dir.mkdir(exist_ok=True)
    server.start(log_dir)
    channel = insecure_channel(f"127.0.0.1:{args.port + 1}")
    gen, ctl = pbg.GenerationStub(channel), pbg.ControlStub(channel)
    lock, window = threading.Lock(), collections.defaultdict(list)  # outcome -> stream seconds, this window
    errors: list[str] = []
    stop = threading.Event()

    def client(c: int) -> None:
        i = c
        while not stop.is_set():
            t0 = time.perf_counter()
            try:
                outcome = one_stream(gen, args.port, i, args.max_tokens)
            except Exception as e:  # counted, and the run goes on: the soak measures what fails
                outcome = "error"
                with lock:
                    errors.append(repr(e)[:300])
            with lock:
                window[outcome].append(time.perf_counter() - t0)
            i += args.clients

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(args.clients)]
    rows, start = [], time.time()
    try:
        for t in threads:
            t.start()
        while time.time() - start < args.minutes * 60:
            time.sleep(args.sample_s)
            with lock:
                ended = {k: list(v) for k, v in window.items()}
                window.clear()
            stats = ctl.GetStats(pb.StatsRequest(), timeout=10)
            full = ended.get("full", [])
            rss = server_rss(server.proc.pid)
            rows.append({"t_s": round(time.time() - start, 1), "rss_mb": round(sum(rss.values()) / 2**20, 1),
                         "rss_by_process_mb": {k: round(v / 2**20, 1) for k, v in sorted(rss.items())},
                         "kv_usage": round(stats.kv_usage, 4), "running": stats.running,
                         "ended": {k: len(v) for k, v in ended.items()},
                         "full_p50_s": percentile(full, 0.5), "full_p99_s": percentile(full, 0.99)})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "rss_by_process_mb"}), flush=True)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
        server.stop()
    warm = rows[max(0, len(rows) // 10 - 1)]
    growth = rows[-1]["rss_mb"] / warm["rss_mb"] - 1 if rows else 0.0
    totals = collections.Counter()
    for r in rows:
        totals.update(r["ended"])
    summary = {"minutes": args.minutes, "clients": args.clients, "streams": dict(totals), "errors": len(errors),
               "first_errors": errors[:5], "rss_mb_after_warmup": warm["rss_mb"], "rss_mb_end": rows[-1]["rss_mb"],
               "rss_growth": round(growth, 4)}
    print(json.dumps(summary, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "summary": summary, "rows": rows}, indent=1))
    if args.plot:
        plot(rows, args.plot)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["t_s"] / 60 for r in rows]
    fig, (a, b, c) = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    a.plot(t, [r["rss_mb"] for r in rows])
    a.set_ylabel("server RSS, MB")
    b.plot(t, [r["full_p50_s"] for r in rows], label="p50")
    b.plot(t, [r["full_p99_s"] for r in rows], label="p99")
    b.set_ylabel("full stream, s")
    b.legend()
    c.plot(t, [r["kv_usage"] for r in rows])
    c.set_ylabel("KV usage")
    c.set_xlabel("minutes")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
