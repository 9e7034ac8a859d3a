"""OpenAI-compatible request and response shapes (completions and chat completions).

Responses carry one documented extra field, `tidal`, with the speculative-decoding statistics of the
request (forwards, drafted, accepted, mean_acceptance_length, acceptance_by_position).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from workers.config import MAX_LOGPROBS, InvalidRequest
from workers.request import RequestTotals, TokenLogprob

# OpenAI request fields accepted and ignored: they ask nothing of the answer.
IGNORED_FIELDS = ("user", "metadata", "store", "service_tier", "parallel_tool_calls")
# OpenAI request fields not supported yet, accepted only at a value that asks for nothing; any other value is a
# 400 naming the field, never silently ignored (every other unknown field is refused too).
UNSUPPORTED_FIELDS: dict[str, tuple] = {
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = Field(False, description="usage rides on the last chunk whether or not this is set")


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str | None = None
    description: str | None = None
    json_schema: dict = Field(alias="schema")
    strict: bool | None = None  # the output always follows the schema, strict or not


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema', and only with it")
        return self


class StructuredOutputs(BaseModel):
    """vLLM's extra for grammars beyond response_format: one of a JSON schema, a regex, a Lark grammar."""

    model_config = ConfigDict(extra="forbid")

    json_schema: dict | None = Field(None, alias="json")
    regex: str | None = None
    grammar: str | None = None


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stream: bool = False
    stop: str | list[str] | None = Field(None, description="up to 4 stop strings; not part of the returned text")
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None  # vLLM's extra: over prompt and output tokens
    sampler: Literal["lossless", "mix"] | None = None  # Tidal's extra: TiDAR's verifier for this request
    mix_weight: float | None = None  # Tidal's extra: w of the mix sampler (implies it)
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_fields_only(cls, data):
        """Drop the ignored fields and the unsupported ones at their do-nothing values; refuse the rest."""
        if not isinstance(data, dict):
            return data
        asked = [k for k, harmless in UNSUPPORTED_FIELDS.items() if k in data and data[k] not in harmless]
        if asked:
            raise ValueError(f"not supported yet: {', '.join(asked)} (README: 'OpenAI fields')")
        return {k: v for k, v in data.items() if k not in IGNORED_FIELDS and k not in UNSUPPORTED_FIELDS}

    def sampling(self) -> dict:
        return {"max_tokens": self.max_completion_tokens or self.max_tokens, "temperature": self.temperature,
                "top_p": self.top_p, "top_k": self.top_k, "seed": self.seed,
                "stop": (self.stop,) if isinstance(self.stop, str) and self.stop else tuple(self.stop or ()),
                "stop_token_ids": tuple(self.stop_token_ids or ()), "ignore_eos": self.ignore_eos,
                "logprobs": self.alternatives(), "presence_penalty": self.presence_penalty,
                "frequency_penalty": self.frequency_penalty, "repetition_penalty": self.repetition_penalty,
                "sampler": self.sampler, "mix_weight": self.mix_weight, "structured": self.structured()}

    def structured(self) -> dict | None:
        """The grammar asked for, as SamplingParams.structured takes it (None: free text)."""
        fmt, extra = self.response_format, self.structured_outputs
        if fmt is not None and fmt.type != "text" and extra is not None:
            raise InvalidRequest("give response_format or structured_outputs, not both")
        if fmt is not None and fmt.type == "json_object":
            return {"json_schema": json.dumps({"type": "object"})}
        if fmt is not None and fmt.type == "json_schema":
            return {"json_schema": json.dumps(fmt.json_schema.json_schema)}
        if extra is None:
            return None
        return {"json_schema": None if extra.json_schema is None else json.dumps(extra.json_schema),
                "regex": extra.regex, "grammar": extra.grammar}

    def alternatives(self) -> int | None:
        """None: no logprobs; k: each token's logprob and its k most likely alternatives."""
        return None


class CompletionRequest(_Request):
    prompt: str | list[int]
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="alternatives per token")

    def alternatives(self) -> int | None:
        return self.logprobs


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def alternatives(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def prompt(self) -> str:
        """A plain role-tagged transcript; the shipped models have no chat template."""
        return "".join(f"{m.role}: {m.content}\n" for m in self.messages) + "assistant:"


def completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage object; prompt_tokens_details.cached_tokens: prompt tokens the prefix cache held."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def speculative(stats: RequestTotals) -> dict:
    keys = ("forwards", "drafted", "accepted", "mean_acceptance_length", "acceptance_by_position", "tokens_per_forward")
    figures = stats.as_dict()
    return {k: figures[k] for k in keys if k in figures}


def completion_body(rid: str, model: str, text: str, finish: str | None, prompt_tokens: int, completion_tokens: int,
                    stats: RequestTotals, logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs}],
            "usage": usage(prompt_tokens, completion_tokens, stats.cached_tokens), "tidal": speculative(stats)}


def chat_body(rid: str, model: str, text: str, finish: str | None, prompt_tokens: int, completion_tokens: int,
              stats: RequestTotals, logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                         "logprobs": logprobs}],
            "usage": usage(prompt_tokens, completion_tokens, stats.cached_tokens), "tidal": speculative(stats)}


def completion_chunk(rid: str, model: str, text: str, finish: str | None, logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs}]}


def chat_chunk(rid: str, model: str, text: str | None, finish: str | None, first: bool = False,
               logprobs: dict | None = None) -> dict:
    delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]}


def _json_number(logprob: float) -> float:
    """JSON has no -inf or NaN: vLLM's stand-in for a token the model gives no probability."""
    return logprob if math.isfinite(logprob) else -9999.0


def completion_logprobs(entries: list[TokenLogprob], token_text: Callable[[int], str], offset: int) -> dict:
    """The completions API's logprobs object for these tokens; `offset`: characters of text before them.
    top_logprobs maps token text to logprob: the alternatives and the chosen token, as vLLM reports them."""
    tokens = [token_text(e.token_id) for e in entries]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [_json_number(e.logprob) for e in entries],
            "top_logprobs": [{**{token_text(i): _json_number(lp) for i, lp in e.top}, t: _json_number(e.logprob)}
                             for t, e in zip(tokens, entries, strict=True)],
            "text_offset": offsets}


def chat_logprobs(entries: list[TokenLogprob], token_text: Callable[[int], str]) -> dict:
    """The chat API's logprobs object: each token with its bytes and its top_logprobs alternatives."""
    def entry(token_id: int, logprob: float) -> dict:
        text = token_text(token_id)
        return {"token": text, "logprob": _json_number(logprob), "bytes": list(text.encode())}

    return {"content": [{**entry(e.token_id, e.logprob), "top_logprobs": [entry(i, lp) for i, lp in e.top]}
                        for e in entries]}


def error_body(message: str, status: int) -> dict:
    kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
            429: "rate_limit_error", 503: "service_unavailable"}.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "code": status}}
