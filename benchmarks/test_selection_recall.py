"""CPU checks of benchmarks/selection_recall.py's measures (the script itself needs a real model)."""

import torch

from flexwalk import SketchWalkConfig
from flexwalk.reference import token_mask
from selection_recall import block_mass, block_scores, layer_recall, top_blocks


def _qk(n=200, hq=6, hk=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(hq, n, d, generator=g), torch.randn(hk, n, d, generator=g)


def test_block_mass_is_the_dense_softmax_summed_per_block():
    q, k = _qk()
    bs, n = 32, q.shape[1]
    mass = block_mass(q, k, 0.25, bs, chunk=64)
    kk = k.repeat_interleave(3, 0)
    p = ((q @ kk.transpose(-1, -2)) * 0.25).masked_fill(~token_mask(n)[0, 0], float("-inf")).softmax(-1)
    nb = -(-n // bs)
    ref = torch.nn.functional.pad(p, (0, nb * bs - n, 0, nb * bs - n)).reshape(6, nb, bs, nb, bs).sum((2, 4))
    torch.testing.assert_close(mass, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mass.sum((1, 2)), torch.full((6,), float(n)))


def test_recall_orders_and_full_budget():
    q, k = _qk(seed=1)
    cfg = SketchWalkConfig(block_size=16, density=0.2)
    r = layer_recall(q, k, 0.25, cfg)
    # choosing per query head can only keep more of the heads' mass than per KV head, and that more than shared
    assert r["oracle_q"] >= r["oracle_kv"] - 1e-6 >= r["oracle"] - 2e-6
    assert all(0.0 < v <= 1.0 + 1e-6 for v in r.values())
    assert r["oracle"] >= r["mean"] - 1e-6
    full = layer_recall(q, k, 0.25, cfg.replace(density=1.0))
    assert all(abs(v - 1.0) < 1e-5 for v in full.values())


def test_top_blocks_budget_and_forced_blocks():
    nb = 10
    score = torch.randn(1, nb, nb)
    cfg = SketchWalkConfig(block_size=16, density=0.3)
    sel = top_blocks(score, cfg)[0]
    assert torch.all(sel.triu(1) == 0) and torch.all(sel[:, 0]) and torch.all(sel.diagonal())
    assert sel[-1].sum() == nb
    from flexwalk.selection.topk import kept_blocks

    def block_budget(cfg, n_causal, forced):
        return int(kept_blocks(torch.tensor(n_causal), torch.tensor(forced), top_k=cfg.top_k_blocks,
                               density=cfg.density))
    for i in range(nb - 1):
        assert sel[i].sum() == block_budget(cfg, i + 1, min(i + 1, 2))


def test_keylse_ranks_a_block_with_one_strong_key_above_its_mean():
    """The per-key score sees a single matching key that a block mean dilutes."""
    d, bs = 16, 16
    q = torch.zeros(1, 3 * bs, d)
    q[0, 2 * bs:, 0] = 1.0
    k = torch.zeros(1, 3 * bs, d)
    k[0, 0, 0] = 8.0  # block 0: one strong key among zeros
    k[0, bs:2 * bs, 0] = 0.6  # block 1: every key mildly aligned (a higher mean)
    s = block_scores(q, k, 1.0, bs)
    assert s["mean"][2, 1] > s["mean"][2, 0]
    assert s["keylse"][2, 0] > s["keylse"][2, 1]


def test_qtok_rows_sum_to_the_block_tokens_and_stay_causal():
    q, k = _qk(n=100, seed=2)
    s = block_scores(q, k, 0.25, 32)["qtok"]  # blocks of 32, 32, 32, 4 tokens
    torch.testing.assert_close(s.sum(-1), torch.tensor([32.0, 32.0, 32.0, 4.0]))
    assert torch.all(s.triu(1) == 0)
