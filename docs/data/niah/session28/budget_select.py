"""Session 28: the layer-wide selection of the recall scripts (a threshold found by bisection)."""
import torch


def global_sel(prob, K, forced):
    nb = prob.shape[-1]
    causal = torch.ones(nb, nb, dtype=torch.bool).tril()
    pr = prob.masked_fill(~causal, -1.0)
    lo, hi = 0.0, 1.0
    def sel(t): return (forced | (pr > t)) & causal
    for _ in range(60):
        mid = (lo + hi) / 2
        if sel(mid).sum() <= K: hi = mid
        else: lo = mid
    return sel(hi)
