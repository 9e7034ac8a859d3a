"""Which ingress processes that sent this replica requests have died.

Ray does not cancel a streaming actor call when its caller dies: without this watch, a request whose ingress
was killed decodes to its max_tokens for nobody, holding a sequence slot and its KV blocks (docs/reliability.md,
the ingress drill). The replica probes each caller with open streams once a period; a request whose caller
is dead stops at its next engine step, which aborts it and frees its KV.
"""

from __future__ import annotations

import asyncio

from ray.exceptions import RayActorError

from router.events import Caller

PERIOD_S = 1.0
PROBE_TIMEOUT_S = 10.0  # a busy caller is slow to answer, not dead


class CallerWatch:
    def __init__(self):
        self._open: dict[str, tuple[Caller, int]] = {}  # caller actor id -> (caller, streams open from it)
        self.dead: set[str] = set()  # actor ids of callers that died with streams open

    def hold(self, caller: Caller) -> None:
        held = self._open.get(caller.actor_id)
        self._open[caller.actor_id] = (caller, 1 + (held[1] if held else 0))

    def release(self, caller: Caller) -> None:
        _, n = self._open.pop(caller.actor_id)
        if n > 1:
            self._open[caller.actor_id] = (caller, n - 1)
        else:
            self.dead.discard(caller.actor_id)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(PERIOD_S)
            for actor_id, (caller, _) in list(self._open.items()):
                if actor_id in self.dead:
                    continue
                try:
                    await asyncio.wait_for(caller.handle.__ray_ready__.remote(), PROBE_TIMEOUT_S)
                except TimeoutError:
                    pass
                except RayActorError:  # ActorDiedError: gone for good (ActorUnavailableError is not one)
                    self.dead.add(actor_id)
