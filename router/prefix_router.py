"""Replica choice by prefix affinity, bounded by load (a Serve custom request router).

Requests whose first `prefix_tokens` prompt tokens agree go to the same engine replica (rendezvous
hashing over the live replicas, so a scale event only moves the prefixes of the replicas that came or
went), which is where a prefix cache pays off. Affinity yields to load: when the preferred replica's
known queue is `max_imbalance` requests longer than the shortest, the request goes to the least
loaded replicas instead, and prompts shorter than `prefix_tokens` are routed by load alone. Serve then
probes the chosen rank and falls through to the next on refusal.
"""

from __future__ import annotations

import hashlib

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from router.events import EngineRequest


def prefix_key(prompt: list[int] | str, prefix_tokens: int) -> bytes:
    head = prompt[:prefix_tokens] if isinstance(prompt, list) else prompt[: 4 * prefix_tokens]
    return hashlib.blake2b(repr(head).encode(), digest_size=8).digest()


def rank(key: bytes, replica_ids: list[str], queue_lens: list[int | None], max_imbalance: int) -> list[list[int]]:
    """Indices of replicas in preference ranks: [[affinity replica], [the rest by load]] or by load only."""
    order = sorted(range(len(replica_ids)),
                   key=lambda i: hashlib.blake2b(key + replica_ids[i].encode(), digest_size=8).digest())
    known = [q for q in queue_lens if q is not None]
    shortest = min(known) if known else 0
    by_load = sorted(range(len(replica_ids)), key=lambda i: (queue_lens[i] is None, queue_lens[i] or 0))
    best = order[0]
    if queue_lens[best] is not None and queue_lens[best] - shortest >= max_imbalance:
        return [by_load]
    return [[best], [i for i in by_load if i != best]]


class PrefixAffinityRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, prefix_tokens: int = 64, max_imbalance: int = 4, **kwargs):
        self.prefix_tokens, self.max_imbalance = prefix_tokens, max_imbalance

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        request = pending_request.args[0] if pending_request is not None and pending_request.args else None
        if not isinstance(request, EngineRequest) or len(request.prompt) < self.prefix_tokens:
            return [candidate_replicas]  # no prefix worth a cache: the least loaded replica (Serve probes them)
        ids = [r.replica_id.unique_id for r in candidate_replicas]
        lens = [self._replica_queue_len_cache.get(r.replica_id) for r in candidate_replicas]
        ranks = rank(prefix_key(request.prompt, self.prefix_tokens), ids, lens, self.max_imbalance)
        return [[candidate_replicas[i] for i in r] for r in ranks if r]
