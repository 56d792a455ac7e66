"""How gen picks the next token from a model's logits: greedy, or a draw at a
temperature, narrowed to the top k tokens or the top p of the probability mass.
Torch only, like model.py, whose GPT.generate_stream calls it."""
import torch


def sample_next(logits, greedy=False, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick one token per row of logits (B, vocab).

    The draw is one uniform number per row looked up in the cumulative
    probabilities, with top-k narrowed to its k candidates first: torch.multinomial
    over the whole vocabulary costs a sizeable share of a CPU decoding step
    (docs/benchmarks.md), this a small one. The columns stay in vocabulary order,
    so a near-tie that two runs (cache or not, CPU or GPU) rank differently does
    not change the token drawn."""
    if greedy:  # max's index is argmax's (the first of equal maxima), in half the time on CPU
        return logits.max(dim=-1).indices
    logits = logits.float() / temperature
    candidates = None  # vocabulary ids of the columns of logits, once narrowed to top-k
    if top_k is not None and top_k < logits.size(-1):
        candidates = torch.topk(logits, top_k, dim=-1).indices.sort(dim=-1).values
        logits = logits.gather(-1, candidates)
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token once the ones ranked above it already hold top_p of the mass;
        # the best token is always kept
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))
    cdf = logits.softmax(dim=-1).cumsum(dim=-1)
    u = torch.rand(cdf.size(0), 1, generator=generator, device=cdf.device, dtype=cdf.dtype) * cdf[:, -1:]
    # the first column whose cumulative probability exceeds u: a column of
    # probability p is drawn with probability p, one of probability 0 never
    choice = torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.size(-1) - 1)
    return (choice if candidates is None else candidates.gather(-1, choice))[:, 0]
