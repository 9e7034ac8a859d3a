"""Placement groups for worker groups: one bundle per worker actor, packed on one node."""

from __future__ import annotations

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


def worker_bundle(use_gpu: bool) -> dict:
    return {"CPU": 1, "GPU": 1} if use_gpu else {"CPU": 1}


def create_group_placement(size: int, use_gpu: bool, timeout_s: float = 60.0) -> PlacementGroup:
    """STRICT_PACK: an expert-parallel group talks every layer, so it must share a node."""
    pg = placement_group([worker_bundle(use_gpu)] * size, strategy="STRICT_PACK")
    try:
        ray.get(pg.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError as e:
        remove_placement_group(pg)
        raise RuntimeError(
            f"no node can host {size} workers ({worker_bundle(use_gpu)} each) within {timeout_s:.0f}s") from e
    return pg


def in_bundle(pg: PlacementGroup, index: int) -> PlacementGroupSchedulingStrategy:
    return PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=index)


def remove_group_placement(pg: PlacementGroup) -> None:
    remove_placement_group(pg)
