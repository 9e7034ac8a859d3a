"""Incremental detokenization and stop strings: the same code decides where a request stops in the engine
and what text its answer shows at the edge, so the two always agree."""

from __future__ import annotations

from tokenizers.decoders import DecodeStream


class Detokenizer:
    """Incremental text with the `tokenizers` streaming decoder (DecodeStream): work per token is constant,
    where decoding the whole output again at every step grew with its length; an incomplete UTF-8 sequence
    waits for the token that completes it. Special tokens are skipped, as Tokenizer.decode does.

    With stop strings, the text ends where the first of them begins (it is not shown), the token whose text
    completes one is the request's last, and `add` holds back a tail that could still become one, so a
    stream never shows characters a stop string would take back."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.longest = max((len(s) for s in stop), default=0)
        self.stream = DecodeStream(skip_special_tokens=True)
        self.ids: list[int] = []
        self.text = ""  # decoded so far, cut where a stop string began
        self.sent = 0  # characters of `text` returned by `add`
        self.held = False  # the last token's text is not decoded yet (an incomplete UTF-8 sequence)
        self.stopped: str | None = None  # the stop string that ended the text

    def feed(self, token_id: int) -> bool:
        """Decode one more token; True when its text completes a stop string (it is the last token)."""
        if self.tokenizer is None or self.stopped is not None:
            return False
        self.ids.append(token_id)
        chunk = self.stream.step(self.tokenizer, token_id)
        self.held = chunk is None
        if not chunk:
            return False
        start = max(0, len(self.text) - self.longest + 1)  # a match may begin in earlier text
        self.text += chunk
        found = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if not found:
            return False
        cut, self.stopped = min(found)  # the earliest-starting match ends the text
        self.text = self.text[:cut]
        return True

    def add(self, token_ids: list[int], final: bool = False) -> str:
        """Feed tokens; return the new text that is safe to show (on the final call, all of it)."""
        for t in token_ids:
            self.feed(t)
        if final and self.held and self.stopped is None:  # what decoding the whole output would show
            self.text += self.tokenizer.decode(self.ids)[len(self.text):]
            self.held = False
        end = len(self.text) if final or self.stopped is not None else len(self.text) - self._partial_match()
        out, self.sent = self.text[self.sent:end], max(self.sent, end)
        return out

    def _partial_match(self) -> int:
        """Length of the longest tail of the text that is the beginning of a stop string."""
        for k in range(min(self.longest - 1, len(self.text) - self.sent), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0
