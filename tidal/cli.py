"""`tidal` command line: generate (offline), serve (gRPC + HTTP on Ray Serve), client (gRPC), deploy render
(KubeRay)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "zaya-code-tiny"


def _token_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError("--prompt-token-ids takes comma-separated integers, e.g. 1,2,3") from None


def auto_mode(model_dir: str | None, mask_token_id: int | None) -> str:
    """'tidar' for a TiDAR-converted model (its config.json names a mask token, or one is given), else 'ar'."""
    from workers.loader import ModelLoadError, load_hf_config
    from workers.tidar import resolve_mask_token

    if mask_token_id is not None:
        return "tidar"
    try:
        return "tidar" if resolve_mask_token(load_hf_config(model_dir), None) is not None else "ar"
    except (ModelLoadError, TypeError):
        return "ar"  # the engine reports a missing or broken model dir itself


def add_request_options(parser: argparse.ArgumentParser) -> None:
    """The per-request sampling options `generate` and `client` share: penalties and structured output."""
    parser.add_argument("--presence-penalty", type=float, help="OpenAI's, over output tokens, [-2, 2]")
    parser.add_argument("--frequency-penalty", type=float, help="OpenAI's, per occurrence in the output, [-2, 2]")
    parser.add_argument("--repetition-penalty", type=float, help="vLLM's, over prompt and output tokens (1: off)")
    shape = parser.add_mutually_exclusive_group()
    shape.add_argument("--json-schema", help="the output follows this JSON schema (JSON text, or @file)")
    shape.add_argument("--regex", help="the output matches this regular expression")
    shape.add_argument("--grammar", help="the output follows this Lark grammar (text, or @file)")


def structured(args) -> dict | None:
    """--json-schema / --regex / --grammar as SamplingParams.structured takes them."""
    for name in ("json_schema", "regex", "grammar"):
        value = getattr(args, name)
        if value is not None:
            return {name: Path(value[1:]).read_text() if value.startswith("@") and name != "regex" else value}
    return None


PENALTIES = ("presence_penalty", "frequency_penalty", "repetition_penalty")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tidal", description="Serve and run block-diffusion LLMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generate a completion for one prompt, offline")
    g.add_argument("--model", default=str(DEFAULT_MODEL), help="HF-format model directory (default: shipped model)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs tokenizer.json in the model directory)")
    src.add_argument("--prompt-token-ids", type=_token_ids, help="comma-separated prompt token ids")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int)
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--stop", action="append", help="a stop string (repeat for up to 4); not part of the text")
    g.add_argument("--logprobs", type=int, help="with --json: each token's logprob and this many alternatives")
    add_request_options(g)
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    g.add_argument("--mode", choices=["auto", "ar", "tidar"], default="auto",
                   help="auto (default): tidar when the model names a mask token (and the backend is native), else ar")
    g.add_argument("--backend", choices=["native", "vllm"], default="native",
                   help="engine: ours (default), or vLLM with the tidal plugin (needs the vllm-cpu/vllm-gpu extra)")
    g.add_argument("--block-size", type=int, help="TiDAR drafts per step, K (default 16)")
    g.add_argument("--levels", type=_token_ids, help="TiDAR proposal levels, e.g. 0,4,8,16")
    g.add_argument("--two-forward", action="store_true", help="verify pass, then a separate draft pass")
    g.add_argument("--sampler", choices=["lossless", "mix"], help="TiDAR acceptance rule (default lossless)")
    g.add_argument("--mix-weight", type=float, help="logit-mixing weight w of the AR logits (default 0.5)")
    g.add_argument("--draft-temperature", type=float, help="0: argmax drafts; > 0: sampled drafts")
    g.add_argument("--mask-token-id", type=int, help="mask token, when config.json names none")
    g.add_argument("--fixed-drafting", action="store_true",
                   help="draft K tokens with all the levels every step (default: adapt K and levels to measured "
                        "acceptance and step cost, down to AR)")
    g.add_argument("--ep", type=int, default=1,
                   help="expert-parallel worker actors on a local Ray (default 1: in-process)")
    g.add_argument("--no-prefix-caching", action="store_true", help="recompute every prompt (no KV block sharing)")
    g.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    sv = sub.add_parser("serve", help="serve gRPC and OpenAI-style HTTP on a local (or given) Ray cluster")
    sv.add_argument("--model", help="HF-format model directory (default: shipped model)")
    sv.add_argument("--config", help="YAML/JSON ServeConfig file; flags override it")
    sv.add_argument("--grpc-port", type=int)
    sv.add_argument("--http-port", type=int)
    sv.add_argument("--host", dest="http_host", help="HTTP bind address (default 127.0.0.1)")
    sv.add_argument("--ep", type=int, help="expert-parallel worker actors per engine replica")
    sv.add_argument("--replicas", type=int, help="engine replicas (fixed; use --config for autoscaling)")
    sv.add_argument("--ingress-replicas", type=int, help="ingress processes sharing the ports (default 2)")
    sv.add_argument("--mode", choices=["auto", "ar", "tidar"],
                    help="default: the config's; auto (the default without --config): tidar when the model names a "
                         "mask token, else ar")
    sv.add_argument("--api-key", help="require 'authorization: Bearer KEY' on every request")
    sv.add_argument("--stream-interval-ms", type=float,
                    help="send a request's new tokens at most this often (first and last at once; 0: every step)")
    sv.add_argument("--ray-address", help="join this Ray cluster instead of starting a local one")
    sv.add_argument("--no-prefix-caching", action="store_true",
                    help="recompute every prompt (default: repeated prefixes share KV blocks)")

    d = sub.add_parser("deploy", help="deployment artifacts: KubeRay RayService and Serve configs")
    dsub = d.add_subparsers(dest="deploy_command", required=True)
    r = dsub.add_parser("render", help="render the RayService (or with --local a CPU Serve config) from a ServeConfig")
    r.add_argument("--config", help="YAML/JSON ServeConfig file (default: the shipped model on one GPU per replica)")
    r.add_argument("--model",
                   help="override engine.model (a path on the models volume; a local directory with --local)")
    r.add_argument("--image", help="container image of the Ray pods (build it from deploy/Dockerfile)")
    r.add_argument("--name", help="RayService name (default tidal)")
    r.add_argument("--namespace")
    r.add_argument("--gpus-per-node", type=int, help="AMD GPUs per worker node (default 8)")
    r.add_argument("--min-nodes", type=int, help="default: what autoscaling.min_replicas needs")
    r.add_argument("--max-nodes", type=int, help="default: what autoscaling.max_replicas needs")
    r.add_argument("--worker-cpus", type=int, help="CPUs a worker pod requests (default 96)")
    r.add_argument("--worker-memory", help="memory a worker pod requests (default 1536Gi)")
    r.add_argument("--otlp-endpoint", help="export traces over OTLP/gRPC to this endpoint")
    r.add_argument("--local", action="store_true", help="the same Serve config for this CPU machine (serve run)")
    r.add_argument("--out", help="write rayservice.yaml + serve-config.yaml (or serve-local.yaml) here, not stdout")

    c = sub.add_parser("client", help="send one request to a running `tidal serve` over gRPC")
    c.add_argument("--target", default="127.0.0.1:9000")
    c.add_argument("prompt", nargs="?", help="prompt text")
    c.add_argument("--prompt-token-ids", type=_token_ids)
    c.add_argument("--max-tokens", type=int, default=64)
    c.add_argument("--temperature", type=float)
    c.add_argument("--seed", type=int)
    c.add_argument("--stop", action="append", help="a stop string (repeat for up to 4)")
    c.add_argument("--logprobs", type=int, help="print each token's logprob and this many alternatives (unary)")
    add_request_options(c)
    c.add_argument("--sampler", choices=["lossless", "mix"], help="TiDAR's verifier for this request")
    c.add_argument("--mix-weight", type=float, help="w of the mix sampler for this request (implies it)")
    c.add_argument("--stream", action="store_true", help="print tokens as each decode step commits them")
    c.add_argument("--api-key")
    c.add_argument("--stats", action="store_true", help="print the server's live stats instead")
    return parser


def cmd_serve(args) -> int:
    import signal
    import threading

    from cluster.ray_cluster import ensure_ray
    from router import app
    from router.config import AutoscalingConfig, ServeConfig
    from workers.config import InvalidRequest
    from workers.loader import ModelLoadError, load_hf_config

    overrides = {"engine.model": args.model, "engine.mode": args.mode, "engine.ep_size": args.ep,
                 "grpc_port": args.grpc_port, "http_port": args.http_port, "http_host": args.http_host,
                 "api_key": args.api_key, "stream_interval_ms": args.stream_interval_ms,
                 "ingress_replicas": args.ingress_replicas,
                 "engine.prefix_caching": False if args.no_prefix_caching else None}
    if args.replicas:
        overrides["autoscaling"] = AutoscalingConfig(min_replicas=args.replicas, max_replicas=args.replicas)
    if not args.config and not args.model:
        overrides["engine.model"] = str(DEFAULT_MODEL)
    auto = args.mode == "auto" or (args.mode is None and not args.config)
    if auto:
        overrides["engine.mode"] = None
    try:
        cfg = ServeConfig.load(args.config, **overrides)
        if auto:
            cfg = ServeConfig.load(args.config, **{**overrides, "engine.mode": auto_mode(cfg.engine.model, None)})
        load_hf_config(cfg.engine.model)  # a wrong model path fails here, not in a replica after Ray starts
    except (InvalidRequest, ModelLoadError) as e:
        print(f"tidal: error: {e}", file=sys.stderr)
        return 2
    ensure_ray(args.ray_address)
    stop = threading.Event()  # handlers go in before the app starts: clients can reach its gRPC port early
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    app.start(cfg)
    print(f"tidal: serving {cfg.engine.model} as '{cfg.model_name}': gRPC on {cfg.grpc_host}:{cfg.grpc_port} "
          f"(tidal.v1.Generation, tidal.v1.Control), "
          f"HTTP on http://{cfg.http_host}:{cfg.http_port}/v1", flush=True)
    stop.wait()
    print("tidal: draining and shutting down", file=sys.stderr, flush=True)
    app.drain_and_stop()
    return 0


def cmd_deploy(args) -> int:
    from deploy import render as rd
    from router.config import ServeConfig
    from workers.config import InvalidRequest

    spec = rd.ClusterSpec(**{k: v for k, v in dict(
        name=args.name, namespace=args.namespace, image=args.image, gpus_per_node=args.gpus_per_node,
        min_nodes=args.min_nodes, max_nodes=args.max_nodes, worker_cpus=args.worker_cpus,
        worker_memory=args.worker_memory, otlp_endpoint=args.otlp_endpoint).items() if v is not None})
    try:
        cfg = ServeConfig.load(args.config) if args.config else rd.default_config(spec)
        model = args.model or (str(DEFAULT_MODEL) if args.local and not args.config else None)
        files = rd.render(cfg, spec, local=args.local, model=model)
    except InvalidRequest as e:
        print(f"tidal: error: {e}", file=sys.stderr)
        return 2
    if cfg.api_key:
        print("tidal: warning: api_key is in the rendered args in plain text", file=sys.stderr)
    if not args.out:
        print(next(iter(files.values())), end="")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (out / name).write_text(text)
        print(f"tidal: wrote {out / name}", file=sys.stderr)
    return 0


def cmd_client(args) -> int:
    import grpc

    from proto import tidal_pb2 as pb
    from proto import tidal_pb2_grpc as pbg
    from proto.channel import insecure_channel

    metadata = [("authorization", f"Bearer {args.api_key}")] if args.api_key else []
    channel = insecure_channel(args.target)
    try:
        if args.stats:
            print(pbg.ControlStub(channel).GetStats(pb.StatsRequest(), metadata=metadata))
            return 0
        sampling = pb.SamplingParams(max_tokens=args.max_tokens)
        if args.temperature is not None:
            sampling.temperature = args.temperature
        if args.seed is not None:
            sampling.seed = args.seed
        sampling.stop.extend(args.stop or ())
        for name in ("logprobs", "mix_weight", *PENALTIES):
            if getattr(args, name) is not None:
                setattr(sampling, name, getattr(args, name))
        sampling.sampler = args.sampler or ""
        if (shape := structured(args)) is not None:
            sampling.structured.CopyFrom(pb.StructuredOutput(**shape))
        request = pb.GenerateRequest(sampling=sampling, return_text=True)
        if args.prompt_token_ids:
            request.token_ids.ids.extend(args.prompt_token_ids)
        else:
            request.text = args.prompt or ""
        stub = pbg.GenerationStub(channel)
        if args.stream:
            for msg in stub.GenerateStream(request, metadata=metadata):
                print(msg.text, end="", flush=True)
            print()
        else:
            reply = stub.Generate(request, metadata=metadata)
            print(reply.text)
            for e in reply.logprobs:
                alternatives = " ".join(f"{t.token_id}:{t.logprob:.4f}" for t in e.top)
                print(f"{e.token_id}\t{e.logprob:.4f}\t{alternatives}".rstrip())
    except grpc.RpcError as e:
        print(f"tidal: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1
    return 0


def cmd_generate(args) -> int:
    from workers.backends import EngineStartError, create_engine
    from workers.config import EngineConfig, InvalidRequest, SamplingParams, TidarConfig
    from workers.detokenizer import Detokenizer
    from workers.loader import ModelLoadError, load_tokenizer

    engine = None
    try:
        params = SamplingParams.make(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                     top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos,
                                     stop=tuple(args.stop or ()), logprobs=args.logprobs,
                                     structured=structured(args), **{name: getattr(args, name) for name in PENALTIES})
        tidar = {k: v for k, v in dict(block_size=args.block_size, levels=args.levels,
                                        two_forward=args.two_forward or None,
                                        sampler=args.sampler, mix_weight=args.mix_weight,
                                        draft_temperature=args.draft_temperature,
                                        mask_token_id=args.mask_token_id).items() if v is not None}
        if args.fixed_drafting:
            tidar["schedule"] = [{"max_batch": 1 << 30, "block_size": args.block_size or 16,
                                  "levels": args.levels or TidarConfig().levels}]
        mode = args.mode
        if mode == "auto":  # TiDAR runs on the native backend; vLLM's CPU path is AR only
            mode = auto_mode(args.model, args.mask_token_id) if args.backend == "native" else "ar"
        engine = create_engine(EngineConfig.make(model=args.model, dtype=args.dtype, mode=mode, tidar=tidar,
                                                 ep_size=args.ep, backend=args.backend,
                                                 prefix_caching=not args.no_prefix_caching))
        prompt = args.prompt if args.prompt is not None else args.prompt_token_ids
        out = engine.generate([prompt], params)[0]
        tokenizer = load_tokenizer(args.model)
    except (InvalidRequest, ModelLoadError, EngineStartError) as e:
        print(f"tidal: error: {e}", file=sys.stderr)
        return 2
    finally:
        if engine is not None:
            engine.shutdown()
    text = Detokenizer(tokenizer, params.stop).add(out.output_token_ids, final=True) if tokenizer is not None else ""
    if args.json:
        print(json.dumps({"text": text, "token_ids": out.output_token_ids, "prompt_token_ids": out.prompt_token_ids,
                          "finish_reason": out.finish_reason, "stats": out.stats.as_dict(),
                          **({"logprobs": [{"token_id": e.token_id, "logprob": e.logprob, "top": e.top}
                                           for e in out.logprobs]} if out.logprobs is not None else {})}))
    else:
        print(text if tokenizer is not None else " ".join(map(str, out.output_token_ids)))
        s = out.stats
        print(f"[{s.generated_tokens} tokens, {s.forwards} forwards, "
              f"{s.tokens_per_forward:.2f} tokens/forward, finish: {out.finish_reason}]", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"generate": cmd_generate, "serve": cmd_serve, "client": cmd_client, "deploy": cmd_deploy}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
