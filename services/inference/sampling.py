"""Turning one row of logits into a token: repetition penalty, temperature, top-k, top-p, seeded draws."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.common.errors import InvalidArgument

MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingConfig:
    """Validated sampling settings; the proto's zero values already mapped to 'off'."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    repetition_penalty: float = 1.0

    @classmethod
    def validated(cls, temperature: float, top_p: float, top_k: int, seed: int, repetition_penalty: float,
                  vocab_size: int, prefix: str = "sampling.") -> SamplingConfig:
        if not np.isfinite(temperature) or not 0.0 <= temperature <= 2.0:
            raise InvalidArgument(f"{prefix}temperature", f"must be in [0, 2], got {temperature}")
        if not np.isfinite(top_p) or not 0.0 <= top_p <= 1.0:
            raise InvalidArgument(f"{prefix}top_p", f"must be in (0, 1] (0 means off), got {top_p}")
        if not 0 <= top_k <= vocab_size:
            raise InvalidArgument(f"{prefix}top_k", f"must be in [0, {vocab_size}] (0 means off), got {top_k}")
        if not np.isfinite(repetition_penalty) or not 0.0 <= repetition_penalty <= 2.0:
            raise InvalidArgument(f"{prefix}repetition_penalty",
                                  f"must be in (0, 2] (0 means off), got {repetition_penalty}")
        return cls(temperature=float(temperature), top_p=float(top_p) or 1.0, top_k=int(top_k), seed=int(seed),
                   repetition_penalty=float(repetition_penalty) or 1.0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Sampled:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - np.max(x)
    return shifted - np.log(np.sum(np.exp(shifted)))


class Sampler:
    """Per-sequence sampler; owns its random generator so a seed gives the same tokens in any batch."""

    def __init__(self, config: SamplingConfig, prompt_ids: list[int], top_logprobs: int = 0) -> None:
        self.config = config
        self.top_logprobs = top_logprobs
        # A fixed seed reproduces; seed 0 draws a fresh one. Any int64 is a seed: negative ones are taken
        # modulo 2**64 (numpy wants them non-negative), so distinct seeds stay distinct.
        self._rng = np.random.default_rng(config.seed % 2**64 if config.seed else None)
        self._seen = np.unique(np.asarray(prompt_ids, dtype=np.int64)) if config.repetition_penalty != 1.0 else None

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing per-sequence to apply: the engine samples such rows together, vectorized."""
        return self.config.greedy and self._seen is None and not self.top_logprobs

    def sample(self, logits: np.ndarray) -> Sampled:
        config = self.config
        scores = logits.astype(np.float32, copy=True)
        if self._seen is not None and self._seen.size:
            picked = scores[self._seen]
            scores[self._seen] = np.where(picked > 0, picked / config.repetition_penalty,
                                          picked * config.repetition_penalty)
        if config.greedy:
            logprobs = _log_softmax(scores)
            token = int(np.argmax(scores))
        else:
            scores /= config.temperature
            logprobs = _log_softmax(scores)
            token = self._draw(logprobs)
        if self._seen is not None:
            self._seen = np.union1d(self._seen, [token])
        top: list[tuple[int, float]] = []
        if self.top_logprobs:
            best = np.argpartition(-logprobs, self.top_logprobs)[: self.top_logprobs]
            best = best[np.argsort(-logprobs[best])]
            top = [(int(i), float(logprobs[i])) for i in best]
        return Sampled(token_id=token, logprob=float(logprobs[token]), top=top)

    def _draw(self, logprobs: np.ndarray) -> int:
        config = self.config
        candidates = np.arange(logprobs.size)
        weights = logprobs
        if config.top_k and config.top_k < logprobs.size:
            candidates = np.argpartition(-logprobs, config.top_k - 1)[: config.top_k]
            weights = logprobs[candidates]
        if config.top_p < 1.0:
            order = np.argsort(-weights, kind="stable")
            candidates, weights = candidates[order], weights[order]
            probs = np.exp(weights - weights[0])
            cumulative = np.cumsum(probs / probs.sum())
            keep = int(np.searchsorted(cumulative, config.top_p) + 1)
            candidates, weights = candidates[:keep], weights[:keep]
        probs = np.exp(weights - np.max(weights))
        probs /= probs.sum()
        return int(candidates[self._rng.choice(probs.size, p=probs)])


def greedy_rows(logits: np.ndarray) -> list[Sampled]:
    """Argmax and its logprob for every row of [B, V] logits at once (the plain-greedy fast path)."""
    tokens = np.argmax(logits, axis=1)
    best = logits[np.arange(logits.shape[0]), tokens]
    log_norm = np.log(np.sum(np.exp(logits - best[:, None]), axis=1))
    return [Sampled(token_id=int(t), logprob=float(-z), top=[]) for t, z in zip(tokens, log_norm, strict=True)]
