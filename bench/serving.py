"""Serving overhead: the same streamed requests through Tidal's gRPC server and the in-process engine.

    python -m bench.serving [--model DIR] [--concurrency 1,8,32] [--max-tokens 64]

Reports tokens/s, mean time to first token and mean inter-token latency at each concurrency (the
fastest of --repeat runs of each); the gRPC / in-process ratio is the cost of the serving path
(ingress, the Ray hop to a replica, protobuf).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time

from tidal.cli import DEFAULT_MODEL

PROMPT = "def fibonacci(n):\n    "


def summarize(results: list[tuple[float, list[float]]], wall: float) -> dict:
    """results: per request (start time, arrival time of each streamed chunk with its token count...)."""
    tokens = sum(n for _, chunks in results for _, n in chunks)
    ttft = statistics.mean(chunks[0][0] - start for start, chunks in results)
    gaps = [(b[0] - a[0]) / b[1] for _, chunks in results for a, b in zip(chunks, chunks[1:], strict=False) if b[1]]
    return {"tok_s": tokens / wall, "ttft_ms": 1000 * ttft, "itl_ms": 1000 * statistics.mean(gaps) if gaps else 0.0}


def best(run, repeat: int) -> dict:
    return max((run() for _ in range(repeat)), key=lambda r: r["tok_s"])


def in_process(model: str, concurrency: int, max_tokens: int) -> dict:
    from workers.async_engine import AsyncEngine
    from workers.config import EngineConfig, SamplingParams
    from workers.engine import LLMEngine

    engine = AsyncEngine(LLMEngine(EngineConfig(model=model, max_num_seqs=max(concurrency, 1))))
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)

    async def one():
        start, chunks = time.perf_counter(), []
        async for out in engine.generate(PROMPT, params):
            chunks.append((time.perf_counter(), len(out.new_token_ids)))
        return start, chunks

    async def run():
        return await asyncio.gather(*(one() for _ in range(concurrency)))

    t = time.perf_counter()
    results = asyncio.run(run())
    wall = time.perf_counter() - t
    engine.shutdown()
    return summarize(results, wall)


def through_grpc(port: int, concurrency: int, max_tokens: int) -> dict:

    from proto import tidal_pb2 as pb
    from proto import tidal_pb2_grpc as pbg
    from proto.channel import insecure_channel

    stub = pbg.GenerationStub(insecure_channel(f"127.0.0.1:{port}"))
    request = pb.GenerateRequest(text=PROMPT, sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    results: list = [None] * concurrency

    def one(i: int) -> None:
        start, chunks = time.perf_counter(), []
        for msg in stub.GenerateStream(request, timeout=600):
            chunks.append((time.perf_counter(), len(msg.token_ids)))
        results[i] = (start, chunks)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(concurrency)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return summarize(results, time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--grpc-port", type=int, default=9400)
    ap.add_argument("--repeat", type=int, default=2, help="runs per cell; the fastest is reported (2 noisy cores)")
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]

    from cluster.ray_cluster import ensure_ray
    from router import app
    from router.config import ServeConfig

    ensure_ray()
    cfg = ServeConfig.load(None, **{"engine.model": args.model, "engine.max_num_seqs": max(levels),
                                    "grpc_port": args.grpc_port, "http_port": args.grpc_port + 1})
    app.start(cfg)
    through_grpc(args.grpc_port, 1, 4)  # warm-ups: waits for the replica; first-call costs of torch here
    in_process(args.model, 1, 4)
    print(f"model {args.model}; {args.max_tokens} tokens per request, greedy")
    print("| concurrency | in-process tok/s | gRPC tok/s | gRPC / in-process | TTFT ms in-proc / gRPC "
          "| ITL ms in-proc / gRPC |")
    print("|---|---|---|---|---|---|")
    for c in levels:
        local = best(lambda c=c: in_process(args.model, c, args.max_tokens), args.repeat)
        remote = best(lambda c=c: through_grpc(args.grpc_port, c, args.max_tokens), args.repeat)
        print(f"| {c} | {local['tok_s']:.0f} | {remote['tok_s']:.0f} | {remote['tok_s'] / local['tok_s']:.2f} | "
              f"{local['ttft_ms']:.0f} / {remote['ttft_ms']:.0f} | {local['itl_ms']:.1f} / {remote['itl_ms']:.1f} |",
              flush=True)
    app.drain_and_stop(10)


if __name__ == "__main__":
    main()
