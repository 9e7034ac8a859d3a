"""Token sampling: temperature, top-k and top-p applied the same way everywhere, per-request seeds."""

from __future__ import annotations

import torch

from workers.config import SamplingParams
from workers.request import TokenLogprob


def make_generator(params: SamplingParams, device) -> torch.Generator | None:
    if params.greedy:
        return None
    g = torch.Generator(device=device)
    if params.seed is not None:
        g.manual_seed(params.seed)
    else:
        g.seed()
    return g


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[N, V] logits -> [N, V] probabilities after temperature, top-k, then top-p (T > 0 only)."""
    # shift by the max first, in float64: at a tiny temperature l / T overflows to inf and softmax gives NaN
    z = logits.double()
    logits = ((z - z.amax(dim=-1, keepdim=True)) / params.temperature).float()
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        before = sorted_p.cumsum(-1) - sorted_p  # mass strictly above each token
        drop = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, before >= params.top_p)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample_rows(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """[N, V] probabilities -> [N] token ids drawn with the request's generator."""
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def draft(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> list[int]:
    """[k, V] diffusion logits -> k drafts: argmax (point mass) at temperature 0, else sampled from q."""
    if temperature == 0.0 or generator is None:
        return logits.argmax(dim=-1).tolist()
    return sample_rows(torch.softmax(logits.float() / temperature, dim=-1), generator).tolist()


def greedy_accept(best: list[int], drafts: list[int]) -> tuple[int, int]:
    """The greedy rule (native step and the vLLM GPU sampler): keep drafts while each equals the AR argmax of
    the row before it; best[i] is the argmax of verify row i (row i checks draft i + 1), len(best) > len(drafts).
    Returns (n accepted, the AR token after them)."""
    n = next((i for i, d in enumerate(drafts) if d != best[i]), len(drafts))
    return n, best[n]


def verify(
    ar_logits: torch.Tensor,  # [k + 1, V]: row i is the AR distribution for draft i + 1 (row k: the bonus)
    drafts: list[int],  # k
    draft_logits: torch.Tensor | None,  # [k, V]: the diffusion logits that produced the drafts
    params: SamplingParams,
    generator: torch.Generator | None,
    draft_temperature: float = 0.0,
    mix_weight: float = 1.0,
    argmax: list[int] | None = None,
) -> tuple[int, int]:
    """Accept a prefix of the drafts; return (n accepted, the token sampled after them).

    `argmax`: the argmax of each row of ar_logits when the caller computed it for the whole batch at once
    (greedy, unmixed rows only).

    Lossless at mix_weight 1: greedy keeps drafts equal to the AR argmax; at T > 0 a point-mass draft is
    kept with probability p(d) (else resample from p without d), a sampled draft with min(1, p/q) (else
    resample from max(0, p - q)). Mixing replaces the draft rows' logits by w z_AR + (1 - w) z_D.
    """
    k = len(drafts)
    z = ar_logits.float()
    if mix_weight < 1.0 and k:
        z = torch.cat([mix_weight * z[:k] + (1 - mix_weight) * draft_logits.float(), z[k:]])
    if params.greedy:
        best = argmax if argmax is not None and (mix_weight == 1.0 or not k) else z.argmax(dim=-1).tolist()
        return greedy_accept(best, drafts)
    p = target_probs(z, params)
    sampled = draft_temperature > 0.0
    for i, d in enumerate(drafts):
        u = float(torch.rand(1, generator=generator))
        if sampled:
            q = torch.softmax(draft_logits[i].float() / draft_temperature, dim=-1)
            if u * q[d] < p[i, d]:
                continue
            residual = (p[i] - q).clamp_min(0.0)
        else:
            if u < p[i, d]:
                continue
            residual = p[i].clone()
            residual[d] = 0.0
        if residual.sum() <= 0:  # p and q coincide on the support: any draw from p is exact
            residual = p[i]
        return i, int(sample_rows((residual / residual.sum())[None], generator)[0])
    return k, int(sample_rows(p[k : k + 1], generator)[0])


def token_logprobs(rows: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """rows: [len(tokens), V] the raw AR rows that chose `tokens` (verify row i chose token i). Log-probs of
    the raw distribution, as vLLM reports by default: whatever the sampler then did with the row."""
    lp = torch.log_softmax(rows.float(), dim=-1)
    chosen = lp.gather(1, torch.tensor(tokens, device=lp.device)[:, None])[:, 0].tolist()
    if not top:
        return [TokenLogprob(t, c) for t, c in zip(tokens, chosen, strict=True)]
    values, ids = lp.topk(top, dim=-1)
    return [TokenLogprob(t, c, tuple(zip(i, v, strict=True)))
            for t, c, i, v in zip(tokens, chosen, ids.tolist(), values.tolist(), strict=True)]


def penalize(
    rows: torch.Tensor,  # [n, V] one request's verify rows: row i picks the token after output + drafts[:i]
    params: SamplingParams,
    prompt: list[int],
    output: list[int],
    drafts: list[int],
) -> torch.Tensor:
    """The rows with vLLM's penalties, each row counting the tokens before it (the drafts it verifies after
    included), so verification stays exact for the penalised distribution: repetition_penalty over tokens
    of the prompt or the output (positive logits divided by it, negative ones multiplied), then
    frequency_penalty times each token's count in the output and presence_penalty once per token seen."""
    n, vocab = rows.shape
    dev = rows.device
    counts = torch.bincount(torch.tensor(output, dtype=torch.long, device=dev), minlength=vocab).float()
    counts = counts.expand(n, vocab)
    if n > 1:  # row i also counts drafts[:i]
        steps = torch.nn.functional.one_hot(torch.tensor(drafts[: n - 1], device=dev), vocab).cumsum(0).float()
        counts = counts + torch.cat([torch.zeros(1, vocab, device=dev), steps])
    z = rows.float()
    if params.repetition_penalty != 1.0:
        in_prompt = torch.zeros(vocab, dtype=torch.bool, device=dev)
        in_prompt[torch.tensor(prompt, dtype=torch.long, device=dev)] = True
        r = params.repetition_penalty
        z = torch.where((counts > 0) | in_prompt, torch.where(z > 0, z / r, z * r), z)
    return z - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).float()
