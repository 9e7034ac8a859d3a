"""End to end, as a user meets it: `tidal serve` (TiDAR default, and --mode ar) and `vllm serve` on the same
weights, driven by the official openai client, plus each server's engine in process on the same prompts
(our engine in either mode, and vLLM's through workers.vllm_backend), so served / in-process reads for all.

    python -m bench.e2e [--model models/zaya-code-tiny] [--servers tidal,tidal-ar,vllm] [--concurrency 1,8,32,64]
                        [--apis completions,chat-stream] [--runs 3] [--max-tokens 96] [--json out.json]

Prompts: real code (bench/prompts.py, default: outside the standard library), decoded to text. A cell is one
server, one API and one concurrency c: c client threads each send requests back to back (greedy, ignore_eos,
max_tokens) until max(8, 2c) requests are done. Reported per cell: completion tokens/s over the cell's wall
time (from `usage`); for streamed chat also the time to the first content chunk (TTFT) and the per-token
latency after it, (last chunk - first chunk) / (tokens - 1), as p50 / p99. Runs are interleaved (every server
once per run, started fresh) and alternate their order (`run_order`: odd runs take the servers and the APIs
in reverse, since a server's place in the sequence moved its tokens/s by 5-8% in an A/A check), medians over
runs are quoted with their min-max spread, and ratios are taken within a run: use an even --runs. Fixed
threads for every server: one compute thread for the engine (OMP_NUM_THREADS=1 for Tidal, whose Ray actors
take it; VLLM_CPU_OMP_THREADS_BIND=0 for vLLM's engine core); everything else (ingress, proxy, API server, the
client) shares the rest of the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench.prompts import SOURCES, code_prompts

SERVERS = ("tidal", "tidal-ar", "vllm")
APIS = ("completions", "chat-stream")


@dataclass
class Server:
    kind: str  # one of SERVERS
    model: str
    port: int
    extra: tuple[str, ...] = ()  # more `tidal serve` flags
    name: str = ""  # how the report calls it (default: kind)
    proc: subprocess.Popen | None = None
    log: Path | None = None

    def __post_init__(self):
        self.name = self.name or self.kind

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        if self.kind == "vllm":
            return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
                    "--port", str(self.port), "--dtype", "float32", "--max-num-seqs", "64", "--max-model-len", "2048",
                    "--no-enable-log-requests"]
        mode = ["--mode", "ar"] if self.kind == "tidal-ar" else []
        return ["tidal", "serve", "--model", self.model, "--http-port", str(self.port), "--grpc-port",
                str(self.port + 1), *mode, *self.extra]

    def answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def start(self, log_dir: Path, timeout_s: float = 300) -> None:
        if self.answers():  # the previous server (its Ray processes) must be gone, or it would answer for us
            raise RuntimeError(f"something already serves {self.base_url}")
        env = dict(os.environ, OMP_NUM_THREADS="1", VLLM_CPU_OMP_THREADS_BIND="0", VLLM_CPU_KVCACHE_SPACE="1")
        self.log = log_dir / f"{self.name}.log"
        self.proc = subprocess.Popen(self.command(), stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log}")
            if self.answers():
                return
            time.sleep(2)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer within {timeout_s} s; see {self.log}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
        deadline = time.time() + 60
        while self.answers() and time.time() < deadline:  # Ray's processes outlive the CLI's for a moment
            time.sleep(1)


@dataclass
class Result:
    tokens: int = 0
    errors: int = 0
    first_error: str | None = None
    ttft: list[float] = field(default_factory=list)  # seconds, streamed only
    tpot: list[float] = field(default_factory=list)  # seconds per token after the first, streamed only
    latency: list[float] = field(default_factory=list)  # whole request, seconds


def one_request(client, model: str, api: str, prompt: str, max_tokens: int, res: Result, lock: threading.Lock) -> None:
    extra = {"ignore_eos": True}
    start = time.perf_counter()
    try:
        if api == "completions":
            out = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                            extra_body=extra)
            tokens, ttft, tpot = out.usage.completion_tokens, None, None
        else:
            stream = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
                stream=True, stream_options={"include_usage": True}, extra_body=extra)
            first = last = None
            tokens = 0
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    last = time.perf_counter()
                    first = first or last
                if chunk.usage is not None:
                    tokens = chunk.usage.completion_tokens
            ttft = first - start if first else None
            tpot = (last - first) / (tokens - 1) if first and tokens > 1 else None
    except Exception as e:  # noqa: BLE001 - counted and reported: a benchmark must not hide refusals
        with lock:
            res.errors += 1
            res.first_error = res.first_error or f"{type(e).__name__}: {e}"[:300]
        return
    with lock:
        res.tokens += tokens
        res.latency.append(time.perf_counter() - start)
        if ttft is not None:
            res.ttft.append(ttft)
        if tpot is not None:
            res.tpot.append(tpot)


def cell(server: Server, served_model: str, api: str, c: int, prompts: list[str], max_tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=server.base_url, api_key="bench", max_retries=0, timeout=900)
    work: queue.Queue = queue.Queue()
    for i in range(max(8, 2 * c)):
        work.put(prompts[i % len(prompts)])
    res, lock = Result(), threading.Lock()

    def client_loop() -> None:
        while True:
            try:
                prompt = work.get_nowait()
            except queue.Empty:
                return
            one_request(client, served_model, api, prompt, max_tokens, res, lock)

    threads = [threading.Thread(target=client_loop) for _ in range(c)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t
    return {"tok_s": res.tokens / wall, "errors": res.errors, "first_error": res.first_error,
            "requests": len(res.latency), "ttft_ms": percentiles(res.ttft), "tpot_ms": percentiles(res.tpot),
            "latency_ms": percentiles(res.latency)}


def percentiles(xs: list[float]) -> dict | None:
    if not xs:
        return None
    xs = sorted(xs)
    return {"p50": 1000 * statistics.median(xs), "p99": 1000 * xs[min(len(xs) - 1, round(0.99 * (len(xs) - 1)))]}


# the in-process row beside each server: the same engine (backend and mode) driven by a plain loop
IN_PROCESS = {"tidal": ("in-process", "native", "tidar"), "tidal-ar": ("in-process-ar", "native", "ar"),
              "vllm": ("in-process-vllm", "vllm", "ar")}


def in_process(model: str, backend: str, mode: str, c: int, prompt_ids: list[list[int]], max_tokens: int) -> dict:
    """The engine alone, closed loop at concurrency c on the same prompts (one torch thread), prefills included,
    after a short warm-up like the served cells' (a fresh engine's first steps ran at half speed)."""
    from workers.backends import create_engine
    from workers.config import EngineConfig, SamplingParams

    engine = create_engine(EngineConfig(model=model, backend=backend, mode=mode, max_num_seqs=c))
    try:
        closed_loop(engine, prompt_ids[:8], min(c, 8), SamplingParams(max_tokens=8, ignore_eos=True))
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        t = time.perf_counter()
        tokens = closed_loop(engine, [prompt_ids[i % len(prompt_ids)] for i in range(max(8, 2 * c))], c, params)
        return {"tok_s": tokens / (time.perf_counter() - t)}
    finally:
        engine.shutdown()


def closed_loop(engine, todo: list[list[int]], c: int, params) -> int:
    """Runs every prompt of `todo` with at most c in flight; returns the tokens generated."""
    todo, tokens, running = list(todo), 0, 0
    while todo or engine.has_unfinished():
        while todo and running < c:
            engine.add_request(todo.pop(), params)
            running += 1
        for out in engine.step():
            tokens += len(out.new_token_ids)
            running -= out.finished
    return tokens


def run_order(run: int, servers: list[str], apis: list[str]) -> tuple[list[str], list[str]]:
    """The servers and APIs of run `run` in the order they go: as given on even runs, reversed on odd ones, so
    over an even number of runs each takes every place equally often and the drift of a machine under load
    falls on all of them alike."""
    return (servers[::-1], apis[::-1]) if run % 2 else (list(servers), list(apis))


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.0f} ({min(xs):.0f}-{max(xs):.0f})"


def report(rows: list[dict], servers: list[str], apis: list[str], levels: list[int], runs: int,
           variants: tuple[str, ...] = ()) -> None:
    def get(server, api, c, key="tok_s"):
        return [r[key] for r in rows if (r["server"], r["api"], r["c"]) == (server, api, c)]

    in_rows = {r["server"] for r in rows if r["api"] == "in-process"}
    pairs = [(a, b) for a, b in (("tidal", "tidal-ar"), ("tidal", "vllm"),
                                 *((s, IN_PROCESS[s][0]) for s in servers if s in IN_PROCESS),
                                 *((v, "tidal") for v in variants))
             if a in servers and (b in servers or b in in_rows)]
    for api in apis:
        print(f"\n{api}: completion tokens/s, median (min-max) of {runs} runs")
        head = "| c | " + " | ".join(servers) + " |" + "".join(f" {a} / {b} |" for a, b in pairs)
        print(head)
        print("|---" * (head.count("|") - 1) + "|")
        for c in levels:
            cells = [spread(get(s, api, c)) if get(s, api, c) else "-" for s in servers]
            ratios = []
            for a, b in pairs:
                xs, ys = get(a, api, c), get(b, "in-process" if b in in_rows else api, c)
                per_run = [x / y for x, y in zip(xs, ys, strict=False) if y]
                ratios.append(f"{statistics.median(per_run):.2f}x ({min(per_run):.2f}-{max(per_run):.2f})"
                              if per_run else "-")
            print(f"| {c} | " + " | ".join(cells) + " |" + "".join(f" {r} |" for r in ratios))
        if api == "chat-stream":
            print("\nchat-stream latency, ms, median over runs of each run's p50 / p99: TTFT; "
                  "per-token after the first")
            print("| c | " + " | ".join(f"{s} TTFT | {s} per-token" for s in servers) + " |")
            print("|---" * (1 + 2 * len(servers)) + "|")
            for c in levels:
                out = []
                for s in servers:
                    for key in ("ttft_ms", "tpot_ms"):
                        vals = [v for v in get(s, api, c, key) if v]
                        out.append(f"{statistics.median(v['p50'] for v in vals):.0f} / "
                                   f"{statistics.median(v['p99'] for v in vals):.0f}" if vals else "-")
                print(f"| {c} | " + " | ".join(out) + " |")
    errors = sum(r.get("errors", 0) for r in rows)
    print(f"\nfailed requests: {errors}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/zaya-code-tiny")
    ap.add_argument("--servers", default=",".join(SERVERS))
    ap.add_argument("--apis", default=",".join(APIS))
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--source", default="outside", choices=SOURCES)
    ap.add_argument("--port", type=int, default=8300)
    ap.add_argument("--tidal-args", default="", help="extra `tidal serve` flags, e.g. '--stream-interval-ms 50'")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=FLAGS",
                    help="one more server: `tidal serve FLAGS` (default mode), reported as NAME beside tidal, "
                         "e.g. 'tidal-i1=--ingress-replicas 1' (repeatable)")
    ap.add_argument("--no-in-process", action="store_true")
    ap.add_argument("--json", help="write every cell here")
    args = ap.parse_args()
    servers, apis = args.servers.split(","), args.apis.split(",")
    levels = [int(x) for x in args.concurrency.split(",")]
    variants = dict(v.split("=", 1) for v in args.variant)
    servers += list(variants)

    from workers.loader import load_tokenizer

    tok = load_tokenizer(args.model)
    prompt_ids = code_prompts(tok, args.prompts, args.context, args.source)
    prompts = [tok.decode(p) for p in prompt_ids]
    log_dir = Path(os.environ.get("TMPDIR", "/tmp")) / "tidal-e2e"
    log_dir.mkdir(exist_ok=True)
    print(f"{args.model}: {len(prompts)} {args.source} prompts of <= {args.context} tokens, {args.max_tokens} greedy "
          f"tokens per request (ignore_eos); servers {servers}; logs in {log_dir}", flush=True)
    rows = []
    for run in range(args.runs):
        run_servers, run_apis = run_order(run, servers, apis)
        for name in run_servers:
            kind, flags = ("tidal", variants[name]) if name in variants else (name, "")
            server = Server(kind, args.model, args.port, tuple(args.tidal_args.split() + flags.split()), name)
            server.start(log_dir)
            try:
                served = _served_name(server)
                cell(server, served, "completions", 1, prompts, 8)  # warm-up
                for api in run_apis:
                    for c in levels:
                        r = cell(server, served, api, c, prompts, args.max_tokens)
                        rows.append({"run": run, "server": name, "api": api, "c": c, **r})
                        print(json.dumps(rows[-1]), flush=True)
            finally:
                server.stop()
        if not args.no_in_process:
            import torch

            torch.set_num_threads(1)
            for c in levels:
                for name, backend, mode in (IN_PROCESS[s] for s in run_servers if s in IN_PROCESS):
                    rows.append({"run": run, "server": name, "api": "in-process", "c": c,
                                 **in_process(args.model, backend, mode, c, prompt_ids, args.max_tokens)})
                    print(json.dumps(rows[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    report(rows, servers, apis, levels, args.runs, tuple(variants))


def _served_name(server: Server) -> str:
    """The model id the server lists (each names it its own way)."""
    with urllib.request.urlopen(f"{server.base_url}/models", timeout=5) as r:
        return json.loads(r.read())["data"][0]["id"]


if __name__ == "__main__":
    main()
