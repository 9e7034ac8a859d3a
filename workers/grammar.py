"""Structured output: a request's grammar (JSON schema, regex or Lark) as a token mask on every verify row.

llguidance (Microsoft's grammar engine, as vLLM and SGLang use it) compiles the grammar and walks it token
by token; it reads tokenizer.json directly and depends on nothing else (bench/grammar.py measured it beside
xgrammar on the shipped model: a JSON schema compiles in 0.5 ms vs 2.2 ms, a token's mask takes ~4 us in
both; xgrammar would pull transformers and triton into every install).

Under TiDAR the mask of verify row i is the grammar's state after the committed tokens and the first i
drafts, so acceptance is exact for the constrained distribution; a draft the grammar refuses cuts the block
there, before verification.
"""

from __future__ import annotations

import re

import llguidance as llg
import torch

from workers.config import InvalidRequest, StructuredOutput

JSON_OPTIONS = {"whitespace_flexible": False}  # compact JSON: a small model cannot loop on whitespace


def one_line(report: str) -> str:
    """llguidance's error report without its source excerpt and caret lines, on one line."""
    lines = [line.strip() for line in report.splitlines()]
    return "; ".join(line for line in lines if line and set(line) != {"^"} and not re.match(r"\d+ \|", line))


class GrammarCompiler:
    """The tokenizer as llguidance sees it, built once per engine."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: set[int]):
        self.vocab_size = vocab_size
        eos = min(eos_token_ids) if eos_token_ids else None  # the token a finished grammar allows
        self.tokenizer = llg.LLTokenizer(tokenizer.to_str(), n_vocab=vocab_size, eos_token=eos)

    def compile(self, spec: StructuredOutput) -> RequestGrammar:
        if spec.json_schema is not None:
            grammar = llg.LLMatcher.grammar_from_json_schema(spec.json_schema, defaults=JSON_OPTIONS)
        elif spec.regex is not None:
            grammar = llg.LLMatcher.grammar_from_regex(spec.regex)
        else:
            grammar = llg.LLMatcher.grammar_from_lark(spec.grammar)
        matcher = llg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequest(f"invalid structured output: {one_line(matcher.get_error())}")
        return RequestGrammar(matcher, self.vocab_size)


class RequestGrammar:
    """One request's grammar state, at its committed tokens between steps."""

    def __init__(self, matcher: llg.LLMatcher, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32  # int32 words of one bitmask

    def row_masks(self, drafts: list[int]) -> tuple[torch.Tensor, int]:
        """The allowed tokens of each verify row: ([n + 1, V] bool, n), n the drafts the grammar accepts
        (row i follows the first i of them); the matcher is back at the committed tokens afterwards."""
        bits, n = self._walk(drafts)
        shifts = torch.arange(32, dtype=torch.int32)
        allowed = ((bits[: n + 1, :, None] >> shifts) & 1).bool().flatten(1)[:, : self.vocab_size]
        return allowed, n

    def valid_prefix(self, drafts: list[int]) -> int:
        """How many of the drafts the masks allow in a row from the committed tokens (state unchanged). The
        masks, not llguidance's validate_tokens: where the grammar forces text they allow only its canonical
        tokens, which validate_tokens does not check."""
        return self._walk(drafts)[1] if drafts else 0

    def _walk(self, drafts: list[int]) -> tuple[torch.Tensor, int]:
        """The bitmask of each row up to the first refused draft, and how many drafts came before it."""
        bits = torch.zeros(len(drafts) + 1, self.words, dtype=torch.int32)
        n = 0
        for i in range(len(drafts) + 1):
            self.matcher.unsafe_compute_mask_ptr(bits[i].data_ptr(), self.words * 4)
            if i == len(drafts) or not self._allowed(bits[i], drafts[i]) or not self.matcher.consume_token(drafts[i]):
                break
            n += 1
        self.matcher.rollback(n)
        return bits, n

    @staticmethod
    def _allowed(bits: torch.Tensor, token: int) -> bool:
        return bool((int(bits[token // 32]) >> (token % 32)) & 1)

    def complete_after(self, token: int) -> bool:
        """Commit one token of the output; True when the grammar is complete (nothing more may follow)."""
        self.matcher.consume_token(token)
        return self.matcher.is_stopped()
