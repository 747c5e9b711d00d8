"""Teacher-forced quality of a cache: perplexity and KL against full attention.

Tokens are fed chunk by chunk through the cache, so eviction happens as it would while
a long prompt is read; every position's prediction is compared with full attention's.
"""

import math

import mlx.core as mx
import numpy as np


def chunk_logprobs(model, tokens, cache, chunk_size=64):
    """Yield log-softmax predictions ([n, vocab] float32) for tokens[1:], chunk by chunk."""
    tokens = mx.array(np.asarray(tokens, dtype=np.int32))
    for start in range(0, tokens.size - 1, chunk_size):
        chunk = tokens[start : min(start + chunk_size, tokens.size - 1)]
        logits = model(chunk[None], cache=cache)[0].astype(mx.float32)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        mx.eval(logprobs)
        yield logprobs


def teacher_forced(model, tokens, cache, reference=None, chunk_size=64):
    """Per-position negative log-likelihood of tokens[1:] and, given the reference run's
    chunks (from `reference_logprobs`), per-position KL(reference || this cache).

    Returns (nll [N-1], kl [N-1] or None) as numpy arrays.
    """
    targets = mx.array(np.asarray(tokens, dtype=np.int32)[1:])
    nll, kl, start = [], [], 0
    for i, logprobs in enumerate(chunk_logprobs(model, tokens, cache, chunk_size)):
        n = logprobs.shape[0]
        nll.append(-mx.take_along_axis(logprobs, targets[start : start + n, None], axis=-1)[:, 0])
        if reference is not None:
            ref = reference[i]
            kl.append((mx.exp(ref) * (ref - logprobs)).sum(axis=-1))
        mx.eval(nll[-1], kl[-1] if kl else nll[-1])
        start += n
    nll = np.concatenate([np.array(x) for x in nll])
    return nll, (np.concatenate([np.array(x) for x in kl]) if kl else None)


def reference_logprobs(model, tokens, chunk_size=64):
    """Full-attention predictions, kept in memory as the baseline for KL."""
    from mlx_lm.models.cache import make_prompt_cache

    return list(chunk_logprobs(model, tokens, make_prompt_cache(model), chunk_size))


def reference_nll(reference, tokens):
    """Per-position negative log-likelihood from `reference_logprobs` chunks: [N-1]."""
    logprobs = np.concatenate([np.array(chunk) for chunk in reference])
    targets = np.asarray(tokens)[1:]
    return -logprobs[np.arange(len(targets)), targets]


def perplexity(nll, start=0):
    return float(math.exp(np.mean(nll[start:])))
