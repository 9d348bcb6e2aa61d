"""The forward pass: token log-probs of a batch of pairs in one policy forward.

``batch`` (the three layouts of the same pairs: padded, packed, shared-prompt), ``logprobs`` (the
chunked per-token log-prob kernel), ``packing`` and ``shared_prompt`` (their attention masks and
varlen / flex arguments).
"""
