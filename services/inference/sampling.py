"""Turning one row of logits into a token: logit bias, repetition, presence and frequency penalties, temperature,
top-k, top-p, seeded draws."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from services.common.errors import InvalidArgument

MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024  # token ids one request may bias
LOGIT_BIAS_RANGE = 100.0
PENALTY_RANGE = 2.0  # presence and frequency penalties, as OpenAI bounds them


@dataclass(frozen=True)
class SamplingConfig:
    """Validated sampling settings; the proto's zero values already mapped to 'off'."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), by id

    @classmethod
    def validated(cls, temperature: float, top_p: float, top_k: int, seed: int, repetition_penalty: float,
                  vocab_size: int, prefix: str = "sampling.", presence_penalty: float = 0.0,
                  frequency_penalty: float = 0.0, logit_bias: Mapping[int, float] | None = None) -> SamplingConfig:
        if not np.isfinite(temperature) or not 0.0 <= temperature <= 2.0:
            raise InvalidArgument(f"{prefix}temperature", f"must be in [0, 2], got {temperature}")
        if not np.isfinite(top_p) or not 0.0 <= top_p <= 1.0:
            raise InvalidArgument(f"{prefix}top_p", f"must be in (0, 1] (0 means off), got {top_p}")
        if top_k < 0:
            raise InvalidArgument(f"{prefix}top_k", f"must be >= 0 (0 means off), got {top_k}")
        if not np.isfinite(repetition_penalty) or not 0.0 <= repetition_penalty <= 2.0:
            raise InvalidArgument(f"{prefix}repetition_penalty",
                                  f"must be in (0, 2] (0 means off), got {repetition_penalty}")
        validate_penalties(presence_penalty, frequency_penalty, prefix)
        bias = validated_logit_bias(logit_bias or {}, vocab_size, f"{prefix}logit_bias")
        # k at least the vocabulary keeps every token: the same as off.
        return cls(temperature=float(temperature), top_p=float(top_p) or 1.0,
                   top_k=int(top_k) if top_k < vocab_size else 0, seed=int(seed),
                   repetition_penalty=float(repetition_penalty) or 1.0, presence_penalty=float(presence_penalty),
                   frequency_penalty=float(frequency_penalty), logit_bias=bias)

    @property
    def penalizes_output(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def validate_penalties(presence_penalty: float, frequency_penalty: float, prefix: str = "") -> None:
    """OpenAI's presence and frequency penalties: each finite, in [-2, 2] (InvalidArgument naming it otherwise)."""
    for name, penalty in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if not np.isfinite(penalty) or not -PENALTY_RANGE <= penalty <= PENALTY_RANGE:
            raise InvalidArgument(f"{prefix}{name}", f"must be in [-2, 2] (0 means off), got {penalty}")


def validated_logit_bias(bias: Mapping[int, float], vocab_size: int | None,
                         field: str = "logit_bias") -> tuple[tuple[int, float], ...]:
    """`bias` checked (at most MAX_LOGIT_BIAS ids, each in [0, vocab_size), each bias finite within ±100) and
    sorted by id, zero biases dropped; `vocab_size` None checks the ids against nothing but 0."""
    if len(bias) > MAX_LOGIT_BIAS:
        raise InvalidArgument(field, f"at most {MAX_LOGIT_BIAS} token ids, got {len(bias)}")
    for token, value in bias.items():
        if token < 0 or (vocab_size is not None and token >= vocab_size):
            raise InvalidArgument(field, f"token id {token} is outside the vocabulary"
                                  + ("" if vocab_size is None else f" [0, {vocab_size})"))
        if not np.isfinite(value) or not -LOGIT_BIAS_RANGE <= value <= LOGIT_BIAS_RANGE:
            raise InvalidArgument(field, f"biases must be in [-100, 100], got {value} for token id {token}")
    return tuple(sorted((int(token), float(value)) for token, value in bias.items() if value))


@dataclass(frozen=True)
class Sampled:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


# Nucleus (top-p) candidates are first sought among the tokens whose logit is within this much of the best one
# (e^-12: under 1e-5 of its probability each), widening if their mass falls short of top_p. The nucleus is then
# exactly what sorting the whole vocabulary finds, at a fraction of the cost.
NUCLEUS_MARGINS = (12.0, 24.0)


class Sampler:
    """Per-sequence sampler; owns its random generator so a seed gives the same tokens in any batch.

    A row costs well under a millisecond whatever the settings (0.05-0.25 ms over SmolLM2's logits on a 2-core
    VM), since a decode step samples every sequence of the batch in turn between two model runs: nothing sorts
    the whole vocabulary, and the draw needs no cumulative sum over it.
    """

    def __init__(self, config: SamplingConfig, prompt_ids: list[int], top_logprobs: int = 0) -> None:
        self.config = config
        self.top_logprobs = top_logprobs
        # A fixed seed reproduces; seed 0 draws a fresh one. Any int64 is a seed: negative ones are taken
        # modulo 2**64 (numpy wants them non-negative), so distinct seeds stay distinct.
        self._rng = np.random.default_rng(config.seed % 2**64 if config.seed else None)
        self._seen = np.unique(np.asarray(prompt_ids, dtype=np.int64)) if config.repetition_penalty != 1.0 else None
        self._bias_ids = np.fromiter((t for t, _ in config.logit_bias), dtype=np.int64)
        self._bias = np.fromiter((b for _, b in config.logit_bias), dtype=np.float32)
        # How often each token came out so far, for the presence and frequency penalties.
        self._counts: dict[int, int] | None = {} if config.penalizes_output else None

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing per-sequence to apply: the engine samples such rows together, vectorized."""
        return (self.config.greedy and self._seen is None and self._counts is None and not self._bias.size
                and not self.top_logprobs)

    def sample(self, logits: np.ndarray, mask: np.ndarray | None = None) -> Sampled:
        """The next token from one row of logits. `mask` (a constrained sequence's: float32 per token, 0 where
        allowed, a huge negative number where not; at least one allowed) restricts the draw to the allowed tokens:
        the others get probability 0, and the logprobs are those of the distribution renormalized over the allowed
        ones (the masked distribution)."""
        config = self.config
        scores = logits.astype(np.float32, copy=True)
        if self._bias.size:
            scores[self._bias_ids] += self._bias
        if self._seen is not None and self._seen.size:
            # In float64 and clipped: a tiny penalty (1e-45 is a valid float) would overflow float32 into inf,
            # and inf - inf below is NaN.
            picked = scores[self._seen].astype(np.float64)
            penalized = np.where(picked > 0, picked / config.repetition_penalty, picked * config.repetition_penalty)
            scores[self._seen] = np.clip(penalized, -_FLOAT32_MAX, _FLOAT32_MAX)
        if self._counts:
            ids = np.fromiter(self._counts, dtype=np.int64, count=len(self._counts))
            times = np.fromiter(self._counts.values(), dtype=np.float32, count=len(self._counts))
            scores[ids] -= config.frequency_penalty * times + config.presence_penalty
        if mask is not None:
            scores += mask  # after the penalty, which would divide a masked score back up
        if not config.greedy:
            # The peak first: a tiny temperature then sends the others to -inf (probability 0), never the peak to
            # inf (and inf - inf to NaN).
            scores -= scores.max()
            with np.errstate(over="ignore"):
                scores /= config.temperature
        # log-softmax, kept as (scores - peak) - log_sum: the sampling distribution's logprobs
        peak = scores.max()
        weights = np.exp(scores - peak)  # unnormalized probabilities
        log_sum = np.log(weights.sum(dtype=np.float64))
        token = int(np.argmax(scores)) if config.greedy else self._draw(scores, peak, weights)
        if self._seen is not None:
            self._seen = np.union1d(self._seen, [token])
        if self._counts is not None:
            self._counts[token] = self._counts.get(token, 0) + 1
        top: list[tuple[int, float]] = []
        if self.top_logprobs:
            best = np.argpartition(-scores, self.top_logprobs)[: self.top_logprobs]
            best = best[np.argsort(-scores[best], kind="stable")]
            top = [(int(i), float((scores[i] - peak) - log_sum)) for i in best
                   if mask is None or mask[i] == 0]  # a masked token is no alternative
        return Sampled(token_id=token, logprob=float((scores[token] - peak) - log_sum), top=top)

    def _draw(self, scores: np.ndarray, peak: np.float32, weights: np.ndarray) -> int:
        """A token drawn from the temperature-scaled distribution, restricted by top-k and then top-p.

        The draw walks the candidates in a fixed order (the whole vocabulary by id; a top-k or top-p set most
        likely first, ties by id), so a seed's tokens depend on nothing but the logits.
        """
        config = self.config
        candidates: np.ndarray | None = None  # None: the whole vocabulary
        if config.top_k and config.top_k < scores.size:
            candidates = _top_k(scores, config.top_k)
            if config.top_p < 1.0:
                cumulative = np.cumsum(weights[candidates], dtype=np.float64)
                cumulative /= cumulative[-1]
                candidates = candidates[: int(np.searchsorted(cumulative, config.top_p)) + 1]
        elif config.top_p < 1.0:
            candidates = _nucleus(scores, peak, weights, config.top_p)
        probs = weights if candidates is None else weights[candidates]
        index = _choice(self._rng, probs)
        return index if candidates is None else int(candidates[index])


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """The k most likely tokens, most likely first; of tokens tied at the k-th place, the lowest ids."""
    kth = np.partition(scores, scores.size - k)[scores.size - k]
    above = np.flatnonzero(scores > kth)
    chosen = np.concatenate([above, np.flatnonzero(scores == kth)[: k - above.size]])
    return chosen[np.argsort(-scores[chosen], kind="stable")]


def _nucleus(scores: np.ndarray, peak: np.float32, weights: np.ndarray, top_p: float) -> np.ndarray:
    """The fewest most likely tokens whose probability adds up to at least top_p, most likely first (ties by id).

    Only tokens near the top are sorted: every token outside a margin is less likely than every token inside
    it, so when the inside's mass reaches top_p the nucleus lies wholly inside, exactly as a full sort finds it.
    """
    total = weights.sum(dtype=np.float64)
    for margin in (*NUCLEUS_MARGINS, None):
        inside = np.arange(scores.size) if margin is None else np.flatnonzero(scores >= peak - margin)
        ordered = inside[np.argsort(-scores[inside], kind="stable")]
        cumulative = np.cumsum(weights[ordered], dtype=np.float64) / total
        keep = int(np.searchsorted(cumulative, top_p)) + 1
        if keep <= ordered.size or margin is None:
            return ordered[: min(keep, ordered.size)]
    raise AssertionError("unreachable")


# The inverse-CDF draw sums weights in blocks of this many first, so a draw over the whole vocabulary runs one
# vectorized sum and two short cumulative sums instead of a cumulative sum over 49k tokens.
CHOICE_BLOCK = 256


def _choice(rng: np.random.Generator, weights: np.ndarray) -> int:
    """An index drawn with probability weights[i] / sum(weights) (weights >= 0, not all 0), by inverse CDF in
    index order; one rng.random() per draw, so a seeded generator gives the same draws on any machine."""
    target = rng.random()
    n = weights.size
    if n <= 4 * CHOICE_BLOCK:
        cdf = np.cumsum(weights, dtype=np.float64)
        return _first_above(cdf, target * cdf[-1], weights)
    whole = n - n % CHOICE_BLOCK
    block_sums = weights[:whole].reshape(-1, CHOICE_BLOCK).sum(axis=1, dtype=np.float64)
    if whole < n:
        block_sums = np.append(block_sums, weights[whole:].sum(dtype=np.float64))
    block_cdf = np.cumsum(block_sums)
    target *= block_cdf[-1]
    block = _first_above(block_cdf, target, block_sums)
    start = block * CHOICE_BLOCK
    inside = weights[start:start + CHOICE_BLOCK]
    before = block_cdf[block - 1] if block else 0.0
    return start + _first_above(np.cumsum(inside, dtype=np.float64), target - before, inside)


def _first_above(cdf: np.ndarray, target: float, weights: np.ndarray) -> int:
    """The first i with cdf[i] > target; when rounding leaves target at or past the end, the last i with weight."""
    i = int(cdf.searchsorted(target, side="right"))
    return i if i < cdf.size else int(np.flatnonzero(weights)[-1])


def greedy_rows(logits: np.ndarray) -> list[Sampled]:
    """Argmax and its logprob for every row of [B, V] logits at once (the plain-greedy fast path)."""
    tokens = np.argmax(logits, axis=1)
    best = logits[np.arange(logits.shape[0]), tokens]
    log_norm = np.log(np.sum(np.exp(logits - best[:, None]), axis=1))
    return [Sampled(token_id=int(t), logprob=float(-z), top=[]) for t, z in zip(tokens, log_norm, strict=True)]
