"""Engine-load autoscaling of the EngineReplica deployment: a Ray Serve custom autoscaling policy.

Why not Serve's built-in policy alone: it sizes a deployment by ongoing requests per replica
(`target_ongoing_requests`). An engine's capacity is not a request count: eight long-context requests can
fill a replica's KV pool while eight short ones leave it idle, and once the pool or `max_num_seqs` is full
new requests wait inside the engine, which the request count cannot tell from running ones. So every
replica reports its engine's load and the policy sizes the deployment by the most demanding signal:

    desired = max( max(ongoing requests, Σ running + Σ waiting) / target_ongoing_requests,
                   Σ waiting  / target_queue_depth,       # the engine cannot admit them: saturated
                   Σ kv_usage / target_kv_usage )         # replicas' worth of KV in use

Scaling down therefore needs every signal to agree. Serve applies the rest around this function
(ray.serve.autoscaling_policy._apply_autoscaling_config): upscale/downscale delays, scaling factors,
min/max replicas, and the cold start from zero.

How the signals travel (as in Ray 2.60): a deployment class with a `record_autoscaling_stats()` method
(EngineReplica has one) has it called in each replica every metrics interval; the controller averages each value over
`look_back_period_s` per replica and hands them to the policy as `ctx.aggregated_metrics[name][replica]`.
That is in-band and per running replica (a stopped replica drops out at once), where reading the
stats board actor (router/stats.py) from the controller's control loop would block it on an actor call.
The policy is a class so its targets come from ServeConfig through `policy_kwargs`.

This module must stay light: Serve imports it (the policy is cloudpickled by value) wherever the config
is validated, the Serve controller included.
"""

from __future__ import annotations

import logging
import math

logger = logging.getLogger("ray.serve")
QUEUE_DEPTH, RUNNING, KV_USAGE = "queue_depth", "running", "kv_usage"


def desired_replicas(ongoing: float, waiting: float, running: float, kv_usage: float, *,
                     target_ongoing_requests: float, target_queue_depth: float, target_kv_usage: float) -> float:
    """Replicas the load needs (unrounded; sums over the running replicas)."""
    return max(max(ongoing, running + waiting) / target_ongoing_requests,
               waiting / target_queue_depth,
               kv_usage / target_kv_usage)


class EngineLoadPolicy:
    """Serve calls `policy(ctx: AutoscalingContext) -> (replicas, policy_state)` every control-loop tick."""

    def __init__(self, target_queue_depth: float = 2.0, target_kv_usage: float = 0.8):
        self.target_queue_depth = target_queue_depth
        self.target_kv_usage = target_kv_usage
        self._last = None  # the last decision logged (the controller log says why replicas changed)

    def __call__(self, ctx) -> tuple[float, dict]:
        if ctx.current_num_replicas == 0:
            return ctx.target_num_replicas, {}  # Serve's cold-start path scales up from zero on demand
        metrics = ctx.aggregated_metrics or {}

        def total(name: str) -> float:
            """Sum over the running replicas; one that has not pushed yet (a replica just started: the first
            push comes one metrics interval later) counts as the mean of the others, not as idle."""
            values = [v for v in metrics.get(name, {}).values() if v is not None and math.isfinite(v)]
            if not values:
                return 0.0
            return sum(values) * max(ctx.current_num_replicas, len(values)) / len(values)

        ongoing, waiting, running, kv = ctx.total_num_requests, total(QUEUE_DEPTH), total(RUNNING), total(KV_USAGE)
        desired = desired_replicas(ongoing, waiting, running, kv,
                                   target_ongoing_requests=ctx.config.get_target_ongoing_requests(),
                                   target_queue_depth=self.target_queue_depth, target_kv_usage=self.target_kv_usage)
        decision = (ctx.current_num_replicas, math.ceil(desired))
        if decision != self._last:
            self._last = decision
            logger.info(f"{ctx.deployment_name}: {ctx.current_num_replicas} replicas, load wants {desired:.2f} "
                        f"(ongoing {ongoing:.1f}, running {running:.1f}, waiting {waiting:.1f}, kv {kv:.2f})")
        return desired, {}
