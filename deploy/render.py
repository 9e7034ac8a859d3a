"""Render Tidal's deployment from its typed ServeConfig: a KubeRay RayService for MI355x nodes, and the
Ray Serve config (`serveConfigV2`) it carries, also as a CPU variant for one local machine.

Everything Serve runs comes from `router.app` (import path, application builder) and from the
ServeConfig, so the rendered config cannot drift from the code: re-render after changing either.

Serve config layout (one application, "tidal"):
  args        = the ServeConfig without `autoscaling` (what `build_app` builds the app from);
  deployments = EngineReplica's `autoscaling_config` and `graceful_shutdown_timeout_s`, from
                `autoscaling`. Serve's code version hashes the args, so keeping the scaling knobs out of
                them makes a change of min/max replicas or delays a lightweight in-place update
                (no engine restarts). Changing the policy or anything in args restarts replicas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import yaml

from router.config import AutoscalingConfig, ServeConfig
from workers.config import InvalidRequest

APP_NAME = "tidal"
IMPORT_PATH = "router.app:build_app"
HEADER = ("# Rendered by `tidal deploy render` from a ServeConfig: do not edit by hand; change the config\n"
          "# (or the code) and re-render. See deploy/README.md.\n")
LOCAL_KV_CACHE_BYTES = 256 << 20
LOCAL_MAX_NUM_SEQS = 16
MAX_NAME_LEN = 47  # KubeRay: RayService names longer than this break the generated Service names
DASHBOARD_AGENT_PORT, DASHBOARD_PORT, METRICS_PORT = 52365, 8265, 8080

# ROCm / RCCL settings for MI355X engines. HIP_VISIBLE_DEVICES is Ray's to set (one GPU per replica, or
# the expert-parallel group's); never set ROCR_VISIBLE_DEVICES, which Ray refuses without HIP_VISIBLE_DEVICES.
ROCM_ENV = {
    "HIP_FORCE_DEV_KERNARG": "1",  # kernel arguments in device memory: lower launch latency
    "HSA_NO_SCRATCH_RECLAIM": "1",  # keep scratch allocated: avoids RCCL/all-to-all stalls on MI300-class GPUs
    "NCCL_MIN_NCHANNELS": "112",  # RCCL (read as NCCL_*): use all xGMI channels for intra-node collectives
    "NCCL_DEBUG": "WARN",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",  # a failed collective raises instead of hanging the group
}


@dataclass(frozen=True)
class ClusterSpec:
    """The Kubernetes side: what ServeConfig does not say. Node bounds default to what the replicas need."""

    name: str = "tidal"
    namespace: str | None = None
    image: str = "registry.example.com/tidal:0.1.0"
    gpus_per_node: int = 8
    min_nodes: int | None = None
    max_nodes: int | None = None
    worker_cpus: int = 96
    worker_memory: str = "1536Gi"
    worker_shm: str = "256Gi"
    head_cpus: int = 8
    head_memory: str = "32Gi"
    head_shm: str = "8Gi"
    models_pvc: str = "tidal-models"
    models_mount: str = "/models"
    idle_timeout_s: int = 300  # an idle GPU node is released after this (a new one takes minutes)
    otlp_endpoint: str | None = None


# ---- the Serve config ------------------------------------------------------------------------------------


def serve_config(cfg: ServeConfig) -> dict:
    """The Serve config (ServeDeploySchema) that runs `cfg`: a RayService's serveConfigV2, or `serve run`."""
    auto = cfg.autoscaling
    args = cfg.model_dump(mode="json", exclude_defaults=True, exclude={"autoscaling"})
    return {
        # HTTP through Serve's proxies; gRPC is served by the ingress replicas themselves, on the head node
        "proxy_location": "EveryNode",
        "http_options": {"host": cfg.http_host, "port": cfg.http_port},
        "applications": [{
            "name": APP_NAME,
            "import_path": IMPORT_PATH,
            "route_prefix": "/",
            "args": args,
            "deployments": [{
                "name": "EngineReplica",
                "autoscaling_config": auto.serve_dict(),
                "graceful_shutdown_timeout_s": auto.drain_timeout_s,
            }],
        }],
    }


def local_config(cfg: ServeConfig, model: str | None = None, max_replicas: int = 2) -> ServeConfig:
    """The same config scaled down to one CPU machine: engines on CPU in fp32 without expert parallelism,
    a small KV pool, one ingress, HTTP on localhost, at most `max_replicas` replicas. Ports, model name,
    admission limits and the autoscaling policy stay as they are; replicas start from (at most) one."""
    data = cfg.model_dump(mode="json", exclude_none=True)
    engine = data["engine"]
    engine.update(device="cpu", dtype="float32", ep_size=1,
                  kv_cache_bytes=min(engine["kv_cache_bytes"], LOCAL_KV_CACHE_BYTES),
                  max_num_seqs=min(engine["max_num_seqs"], LOCAL_MAX_NUM_SEQS))
    if model:
        engine["model"] = model
    auto = data["autoscaling"]
    auto["max_replicas"] = min(auto["max_replicas"], max_replicas)
    auto["min_replicas"] = min(auto["min_replicas"], 1)
    if auto.get("initial_replicas") is not None:
        auto["initial_replicas"] = min(max(auto["initial_replicas"], auto["min_replicas"]), auto["max_replicas"])
    data["http_host"] = "127.0.0.1"
    data["ingress_replicas"] = 1
    return ServeConfig(**data)


# ---- the RayService -------------------------------------------------------------------------------------


def replica_shape(cfg: ServeConfig) -> tuple[int, int]:
    """(GPUs, CPUs) one engine replica holds: the replica actor, plus its expert-parallel worker actors."""
    ep = cfg.engine.ep_size
    return (ep, 1 + ep) if ep > 1 else (1, 1)


def node_bounds(cfg: ServeConfig, spec: ClusterSpec) -> tuple[int, int, int]:
    """(replicas per node, min nodes, max nodes), checked against the config."""
    gpus, cpus = replica_shape(cfg)
    if gpus > spec.gpus_per_node:
        raise InvalidRequest(f"an engine replica needs {gpus} GPUs (engine.ep_size) but a node has "
                             f"{spec.gpus_per_node}; expert-parallel groups are packed on one node")
    per_node = spec.gpus_per_node // gpus
    if per_node * cpus > spec.worker_cpus:
        raise InvalidRequest(f"{per_node} replicas per node need {per_node * cpus} CPUs; --worker-cpus is "
                             f"{spec.worker_cpus}")
    auto = cfg.autoscaling
    min_nodes = spec.min_nodes if spec.min_nodes is not None else math.ceil(auto.min_replicas / per_node)
    max_nodes = spec.max_nodes if spec.max_nodes is not None else max(1, math.ceil(auto.max_replicas / per_node))
    if min_nodes < 0 or max_nodes < max(min_nodes, 1):
        raise InvalidRequest(f"need 0 <= min nodes ({min_nodes}) <= max nodes ({max_nodes}), max nodes >= 1")
    if max_nodes * per_node < auto.max_replicas:
        raise InvalidRequest(f"autoscaling.max_replicas={auto.max_replicas} needs "
                             f"{math.ceil(auto.max_replicas / per_node)} nodes of {spec.gpus_per_node} GPUs "
                             f"({per_node} replicas each); max nodes is {max_nodes}")
    return per_node, min_nodes, max_nodes


def _wget_probe(port: int, path: str, timeout_s: int) -> str:
    # the health commands KubeRay itself injects when a pod template has no probes
    return f"wget --tries 1 -T {timeout_s} -q -O- http://localhost:{port}/{path} | grep success"


def _probes(head: bool, serve_port: int) -> dict:
    timeout = 5 if head else 2
    raylet = _wget_probe(DASHBOARD_AGENT_PORT, "api/local_raylet_healthz", timeout)
    if head:
        ready = live = f"{raylet} && {_wget_probe(DASHBOARD_PORT, 'api/gcs_healthz', timeout)}"
    else:
        # a worker is ready for traffic when its Serve proxy answers (KubeRay's own RayService check); a node
        # without replicas runs no proxy and stays unready, which only keeps it out of the Service
        ready, live = f"{raylet} && {_wget_probe(serve_port, '-/healthz', timeout)}", raylet
    return {
        "readinessProbe": {"exec": {"command": ["bash", "-c", ready]}, "initialDelaySeconds": 10,
                           "timeoutSeconds": timeout, "periodSeconds": 5, "successThreshold": 1,
                           "failureThreshold": 10 if head else 1},
        "livenessProbe": {"exec": {"command": ["bash", "-c", live]}, "initialDelaySeconds": 30,
                          "timeoutSeconds": timeout, "periodSeconds": 5, "successThreshold": 1,
                          "failureThreshold": 120},
    }


def _env(spec: ClusterSpec, gpu: bool) -> list[dict]:
    env = {"OTEL_SERVICE_NAME": spec.name}
    if spec.otlp_endpoint:
        env.update(OTEL_TRACES_EXPORTER="otlp", OTEL_EXPORTER_OTLP_ENDPOINT=spec.otlp_endpoint,
                   OTEL_EXPORTER_OTLP_PROTOCOL="grpc")
    else:
        env["OTEL_TRACES_EXPORTER"] = "none"
    if gpu:
        env.update(ROCM_ENV)
    return [{"name": k, "value": v} for k, v in env.items()]


def _pod_template(spec: ClusterSpec, cfg: ServeConfig, head: bool) -> dict:
    component = "head" if head else "worker"
    ports = [{"name": "serve", "containerPort": cfg.http_port, "protocol": "TCP"},
             {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"}]
    if head:
        # KubeRay's head Service (<name>-head-svc) exposes these, and follows the active cluster on upgrades
        ports = [{"name": "gcs-server", "containerPort": 6379, "protocol": "TCP"},
                 {"name": "dashboard", "containerPort": DASHBOARD_PORT, "protocol": "TCP"},
                 {"name": "client", "containerPort": 10001, "protocol": "TCP"},
                 {"name": "grpc", "containerPort": cfg.grpc_port, "protocol": "TCP"}] + ports
        resources = {"cpu": str(spec.head_cpus), "memory": spec.head_memory}
        limits = dict(resources)
    else:
        resources = {"cpu": str(spec.worker_cpus), "memory": spec.worker_memory}
        limits = {**resources, "amd.com/gpu": str(spec.gpus_per_node)}
    container = {
        "name": f"ray-{component}",
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "ports": ports,
        "env": _env(spec, gpu=not head),
        "resources": {"requests": dict(limits), "limits": limits},
        **_probes(head, cfg.http_port),
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"},
                         # the ingress reads the tokenizer and replicas the weights from here
                         {"name": "models", "mountPath": spec.models_mount, "readOnly": True}],
    }
    pod = {
        "containers": [container],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory",
                                                  "sizeLimit": spec.head_shm if head else spec.worker_shm}},
                    {"name": "models", "persistentVolumeClaim": {"claimName": spec.models_pvc, "readOnly": True}}],
    }
    if not head:
        pod["tolerations"] = [{"key": "amd.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    labels = {"app.kubernetes.io/name": "tidal", "app.kubernetes.io/instance": spec.name,
              "app.kubernetes.io/component": component}
    return {"metadata": {"labels": labels}, "spec": pod}


def rayservice(cfg: ServeConfig, spec: ClusterSpec = ClusterSpec()) -> dict:
    """The KubeRay RayService (ray.io/v1) serving `cfg` on MI355x worker nodes."""
    import ray

    if cfg.engine.device == "cpu":
        raise InvalidRequest("engine.device is 'cpu': set engine.device: cuda (ROCm) for the GPU RayService, "
                             "or render the CPU variant with --local")
    if not spec.name or len(spec.name) > MAX_NAME_LEN:
        raise InvalidRequest(f"--name must be 1 to {MAX_NAME_LEN} characters")
    cfg = ServeConfig(**{**cfg.model_dump(mode="json", exclude_none=True), "http_host": "0.0.0.0"})
    _, min_nodes, max_nodes = node_bounds(cfg, spec)
    metadata = {"name": spec.name,
                "labels": {"app.kubernetes.io/name": "tidal", "app.kubernetes.io/instance": spec.name}}
    if spec.namespace:
        metadata["namespace"] = spec.namespace
    worker_params = {"num-gpus": str(spec.gpus_per_node), "metrics-export-port": str(METRICS_PORT)}
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": metadata,
        "spec": {
            # an upgrade switches traffic to a new cluster; the old one lives on long enough for its streams
            "rayClusterDeletionDelaySeconds": math.ceil(cfg.autoscaling.drain_timeout_s) + 60,
            "serveService": {
                "metadata": {"name": f"{spec.name}-serve", "labels": dict(metadata["labels"])},
                "spec": {"ports": [{"name": "serve", "port": cfg.http_port, "targetPort": cfg.http_port,
                                    "protocol": "TCP"}]},
            },
            "serveConfigV2": yaml_text(serve_config(cfg)),
            "rayClusterConfig": {
                "rayVersion": ray.__version__,
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {
                    "upscalingMode": "Default",
                    "idleTimeoutSeconds": spec.idle_timeout_s,
                    "resources": {"requests": {"cpu": "500m", "memory": "512Mi"},
                                  "limits": {"cpu": "500m", "memory": "512Mi"}},
                },
                "headGroupSpec": {
                    # no engines on the head (num-cpus 0): controller, GCS, a proxy, the ingress replicas (gRPC)
                    "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0",
                                       "metrics-export-port": str(METRICS_PORT)},
                    "template": _pod_template(spec, cfg, head=True),
                },
                "workerGroupSpecs": [{
                    "groupName": "mi355x",
                    "replicas": min_nodes,
                    "minReplicas": min_nodes,
                    "maxReplicas": max_nodes,
                    "rayStartParams": worker_params,
                    "template": _pod_template(spec, cfg, head=False),
                }],
            },
        },
    }


# ---- YAML ---------------------------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None  # serveConfigV2 reads as YAML inside the manifest
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def yaml_text(obj) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)


def render(cfg: ServeConfig, spec: ClusterSpec = ClusterSpec(), *, local: bool = False,
           model: str | None = None) -> dict[str, str]:
    """file name -> text, as `tidal deploy render` writes them."""
    if model:
        cfg = ServeConfig(**{**cfg.model_dump(mode="json", exclude_none=True),
                             "engine": {**cfg.engine.model_dump(mode="json", exclude_none=True), "model": model}})
    if local:
        return {"serve-local.yaml": HEADER + yaml_text(serve_config(local_config(cfg)))}
    manifest = rayservice(cfg, spec)
    return {"rayservice.yaml": HEADER + yaml_text(manifest),
            "serve-config.yaml": HEADER + manifest["spec"]["serveConfigV2"]}


def default_config(spec: ClusterSpec = ClusterSpec()) -> ServeConfig:
    """Without --config: the shipped model on the models volume, on one GPU per replica, bf16."""
    return ServeConfig(engine={"model": f"{spec.models_mount}/zaya-tiny-random", "device": "cuda",
                               "dtype": "bfloat16"}, autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=8))
