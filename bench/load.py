"""Many concurrent streams against `tidal serve`: every one must end, in one of the ways a client expects.

    python -m bench.load [--streams 256] [--rounds 2] [--max-tokens 64] [--json docs/figures/load.json]

Starts `tidal serve` (default mode, the shipped model; bench.e2e's launcher) and runs rounds of N streams at
once over loopback: gRPC and SSE, five kinds in turn (gRPC, HTTP, gRPC cancelled after its first message,
HTTP hung up after its first chunk, gRPC with a 0.3 s deadline), lengths from a fifth of --max-tokens to
all of it. Outcomes: full answer, refused early (RESOURCE_EXHAUSTED / 429 before any token), cancelled,
deadline, or hung (no end within --hang-s). After each round: KV usage once idle (GetStats) and the open
file descriptors of the ingress processes that answered.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import grpc

from proto import tidal_pb2 as pb
from proto.channel import insecure_channel

KINDS = ("grpc", "http", "grpc-cancel", "http-cancel", "grpc-deadline")
DEADLINE_S = 0.3


def _pid(served_by: str | None) -> int | None:
    return int(served_by.rsplit(":", 1)[1]) if served_by else None  # "host:pid" (x-tidal-ingress)


def one_stream(gen, http_port: int, i: int, max_tokens: int, metadata=(), ingresses: set | None = None) -> str:
    """Stream i of a load round (kind KINDS[i % 5]); returns its outcome. Anything other than a full answer,
    an early refusal, its own cancellation or its own deadline raises."""
    kind, n = KINDS[i % len(KINDS)], max(1, max_tokens * (1 + i % 5) // 5)
    prompt = [3 + i % 50, 7]
    ingresses = set() if ingresses is None else ingresses
    if kind.startswith("grpc"):
        req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt),
                                 sampling=pb.SamplingParams(max_tokens=n, ignore_eos=True))
        timeout = DEADLINE_S if kind == "grpc-deadline" else 600
        got, t0, call = 0, time.monotonic(), gen.GenerateStream(req, metadata=metadata, timeout=timeout)
        try:
            for message in call:
                got += len(message.token_ids)
                if kind == "grpc-cancel":
                    call.cancel()
        except grpc.RpcError as e:
            ingresses.add(_pid(dict(e.trailing_metadata() or ()).get("tidal-ingress")))  # none on a client cancel
            code = e.code()
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED and got == 0:
                return "refused"
            if code == grpc.StatusCode.CANCELLED and kind == "grpc-cancel":
                return "cancelled"
            if code == grpc.StatusCode.DEADLINE_EXCEEDED and kind == "grpc-deadline":
                return "deadline"
            if code == grpc.StatusCode.UNAVAILABLE and kind == "grpc-deadline" and time.monotonic() - t0 >= DEADLINE_S:
                # gRPC core: on a connection the server is recycling (GOAWAY), the server ends the call at its
                # deadline, finds the connection idle and closes it before the client's own timer fires, so the
                # call ends "Stream removed (Socket closed (GOAWAY received))": its deadline all the same.
                return "deadline"
            raise
        ingresses.add(_pid(dict(call.trailing_metadata()).get("tidal-ingress")))
        if got != n:
            raise AssertionError(f"{kind} stream {i}: {got} of {n} tokens")
        return "full"
    conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=600)
    try:
        body = {"prompt": prompt, "max_tokens": n, "stream": True, "ignore_eos": True}
        headers = {"content-type": "application/json", **dict(metadata)}
        conn.request("POST", "/v1/completions", json.dumps(body), headers)
        resp = conn.getresponse()
        ingresses.add(_pid(resp.headers["x-tidal-ingress"]))
        if resp.status == 429:
            return "refused"
        if resp.status != 200:
            raise AssertionError(f"{kind} stream {i}: HTTP {resp.status} {resp.read()[:200]!r}")
        usage = None
        for line in resp:
            if not line.startswith(b"data: {"):
                continue
            if kind == "http-cancel":
                conn.sock.shutdown(socket.SHUT_RDWR)  # hang up mid-stream, as an OpenAI client's break does
                return "cancelled"
            usage = json.loads(line[6:]).get("usage") or usage
        if usage is None or usage["completion_tokens"] != n:
            raise AssertionError(f"{kind} stream {i}: usage {usage}, wanted {n} tokens")
        return "full"
    finally:
        conn.close()


def load_round(gens: list, http_port: int, streams: int, max_tokens: int, hang_s: float, metadata=()
               ) -> tuple[collections.Counter, set[int], list[str]]:
    """All streams at once, gRPC ones spread over the stubs `gens` (their channels); (outcomes, ingress
    pids seen, errors). A stream still open after hang_s is 'hung'."""
    outcomes, ingresses, errors = collections.Counter(), set(), []
    with ThreadPoolExecutor(streams) as ex:
        futures = [ex.submit(one_stream, gens[i % len(gens)], http_port, i, max_tokens, metadata, ingresses)
                   for i in range(streams)]
        done, hung = wait(futures, timeout=hang_s)
        outcomes["hung"] += len(hung)
        for f in done:
            if f.exception() is None:
                outcomes[f.result()] += 1
            else:
                outcomes["error"] += 1
                errors.append(repr(f.exception())[:300])
    ingresses.discard(None)
    return outcomes, ingresses, errors


def open_fds(pids: set[int]) -> int:
    return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in pids if os.path.isdir(f"/proc/{pid}"))


def main() -> None:
    from bench.e2e import Server
    from proto import tidal_pb2_grpc as pbg

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/zaya-code-tiny")
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--hang-s", type=float, default=300)
    ap.add_argument("--port", type=int, default=8400)
    ap.add_argument("--json")
    args = ap.parse_args()
    server = Server("tidal", args.model, args.port)
    log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / "tidal-load"
    log_dir.mkdir(exist_ok=True)
    server.start(log_dir)
    rows = []
    try:
        channel = insecure_channel(f"127.0.0.1:{args.port + 1}")
        gen, ctl = pbg.GenerationStub(channel), pbg.ControlStub(channel)
        for r in range(args.rounds):
            t0 = time.perf_counter()
            outcomes, pids, errors = load_round([gen], args.port, args.streams, args.max_tokens, args.hang_s)
            wall = time.perf_counter() - t0
            deadline = time.time() + 60
            while (s := ctl.GetStats(pb.StatsRequest(), timeout=10)).running and time.time() < deadline:
                time.sleep(0.5)
            time.sleep(1.0)  # replicas report every 0.5 s
            s = ctl.GetStats(pb.StatsRequest(), timeout=10)
            rows.append({"round": r, "streams": args.streams, "seconds": round(wall, 1), **outcomes,
                         "kv_usage_after": s.kv_usage, "running_after": s.running, "ingress_fds": open_fds(pids),
                         "errors": errors[:5]})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        server.stop()
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    cols = ("full", "refused", "cancelled", "deadline", "hung", "error")
    print("\n| round | seconds | " + " | ".join(cols) + " | KV usage after | ingress fds |")
    print("|---" * (len(cols) + 4) + "|")
    for row in rows:
        print(f"| {row['round']} | {row['seconds']} | " + " | ".join(str(row.get(c, 0)) for c in cols)
              + f" | {row['kv_usage_after']:.3f} | {row['ingress_fds']} |")


if __name__ == "__main__":
    main()
