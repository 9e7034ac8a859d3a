"""Limits the ingress enforces before any work is done: the HTTP body size and the length of a text prompt.
(The gRPC message size is gRPC's own option, the per-connection call bound is counted by the ingress.)"""

from __future__ import annotations

import json

from router import openai_api as oa
from router.config import ServeConfig
from workers.loader import ModelLoadError, load_hf_config

DRAIN_FACTOR = 4  # after a 413, up to this many times the limit of the body is read and dropped


class BodyLimit:
    """413 for a body over `max_request_bytes`, before anything parses it: by its Content-Length, or
    counted as a chunked body streams in (pure ASGI, like IngressHeader)."""

    max_bytes: int | None = None  # set by the ingress from its config (one ingress replica per process)

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        limit = self.max_bytes
        if scope["type"] != "http" or limit is None:
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return await self._refuse(send, limit)
        seen, started, refused = 0, False, False

        async def counted():
            nonlocal seen, refused
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:  # answer now; to the app the client has gone (it stops reading and answers nobody)
                if not (started or refused):
                    refused = True
                    await self._refuse(send, limit)
                    # read (and drop) a little more of the upload, so a client still sending it gets to read
                    # the 413 instead of a reset connection
                    while message.get("more_body") and seen <= DRAIN_FACTOR * limit:
                        message = await receive()
                        seen += len(message.get("body", b""))
                return {"type": "http.disconnect"}
            return message

        async def watched(message):
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except Exception:
            if not refused:
                raise

    @staticmethod
    async def _refuse(send, limit: int) -> None:
        body = json.dumps(oa.error_body(f"request body is over {limit} bytes (max_request_bytes)", 413)).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def prompt_char_limit(tokenizer, config: ServeConfig) -> int | None:
    """Characters beyond which a text prompt cannot fit the context, so it is refused before tokenizing:
    the context times the longest token (no token decodes to more characters than its vocabulary entry
    holds), doubled for normalizers that drop characters. None: no tokenizer or no known context."""
    if tokenizer is None:
        return None
    context = config.engine.max_model_len
    if context is None:
        try:
            context = getattr(load_hf_config(config.engine.model), "max_position_embeddings", None)
        except ModelLoadError:  # the replica reports a broken model directory itself
            return None
    return 2 * context * max(map(len, tokenizer.get_vocab(with_added_tokens=True))) if context else None
