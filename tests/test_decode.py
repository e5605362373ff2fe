"""Sparse decode, functional API: incremental state, per-step selection, outputs vs the oracle.

The configurations set decode_dense_steps=0 so that every step after the prefill selects (by
default the first four attend every block; their own test is at the end)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch._dynamo.utils import counters as dynamo_counters

import flexwalk
from conftest import assert_matches_reference, block_budget, left_padding
from flexwalk import DecodeState, SketchWalkConfig, sketchwalk_decode
from flexwalk.decode.step import decode_select

EPS = torch.finfo(torch.float32).eps
STATE_FIELDS = ("k_sum", "k_count", "k_sketch", "q_sum", "q_count", "transition")


def _qkv(batch, hq, hkv, n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, h, n, d, generator=g) for h in (hq, hkv, hkv))


def _state_tolerance(cfg: SketchWalkConfig, name: str, ref: torch.Tensor) -> float:
    """fp32 error of summing <= block_size terms in another order, amplified by the exponent for W."""
    mag = max(1.0, ref.abs().max().item())
    tol = 4 * cfg.block_size * EPS * mag
    if name == "transition":  # W = softmax(s * A): dW ~ s * dA, A a sum of r products of means
        tol *= cfg.sparsity_exponent * 64
    return tol


def assert_state_equal(a: DecodeState, b: DecodeState, cfg: SketchWalkConfig, what: str) -> None:
    assert a.length == b.length and int(a.pos) == int(b.pos)
    for name in STATE_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape, f"{what}: {name} shape {tuple(x.shape)} != {tuple(y.shape)}"
        err = (x - y).abs().max().item()
        assert err <= _state_tolerance(cfg, name, y), f"{what}: {name} differs by {err:.3g}"
    assert (a.k_bounds is None) == (b.k_bounds is None) == (cfg.decode_scoring != "bound")
    if a.k_bounds is not None:  # extremes are picked, not summed: exactly equal (-inf in empty blocks)
        assert torch.equal(a.k_bounds, b.k_bounds), f"{what}: key bounds differ"


def _token_mask(kv_idx, kv_num, bs, n_live, key_valid):
    """[B, 1, 1, n_live] bool mask of the selected blocks' real keys (the oracle's view)."""
    bsz = kv_idx.shape[0]
    m = torch.zeros(bsz, n_live, dtype=torch.bool)
    for b in range(bsz):
        for j in kv_idx[b, : int(kv_num[b])].tolist():
            m[b, j * bs : (j + 1) * bs] = True
    m &= key_valid[:, :n_live]
    return m[:, None, None, :]


decode_cases = st.fixed_dictionaries(
    {
        "bs": st.sampled_from([16, 32]),
        "n": st.integers(1, 90),
        "steps": st.integers(1, 40),
        "pad": st.integers(0, 40),
        "head_scoring": st.sampled_from(["mean", "per_head"]),
        "walk": st.sampled_from(["walk", "damped", "one_hop"]),
        "density": st.floats(0.05, 1.0),
        "sink": st.integers(0, 2),
        "local": st.integers(1, 3),
        "pinned": st.sampled_from([0.0, 0.1, 0.5]),
        "scoring": st.sampled_from(["bound", "sketch"]),
        "seed": st.integers(0, 3),
    }
)


@given(case=decode_cases)
def test_incremental_state_equals_rebuilt_and_selection_is_valid(case):
    """At every step the absorbed state equals the state rebuilt by a prefill of the whole
    sequence so far, and the step's selection keeps sink + current block within budget."""
    cfg = SketchWalkConfig(decode_dense_steps=0,
        block_size=case["bs"], density=case["density"], head_scoring=case["head_scoring"], walk=case["walk"],
        sink_blocks=case["sink"], local_blocks=case["local"], seed=case["seed"], decode_pinned=case["pinned"],
        decode_scoring=case["scoring"], prefill_scoring="sketch",  # the state carries W_l under the mean-key rule
    )
    n, steps, bs = case["n"], case["steps"], case["bs"]
    pad = min(case["pad"], n - 1)
    total = n + steps
    q, k, v = _qkv(2, 6, 2, total, 16, seed=case["seed"])
    key_valid = left_padding(2, total, [0, pad])
    state = DecodeState.from_prefill(q[:, :, :n], k[:, :, :n], cfg, 3, key_valid=key_valid[:, :n])
    pins = [torch.nonzero(state.pinned[b]).flatten().tolist() for b in range(2)]
    for b in range(2):  # the prompt's real blocks, ceil(fraction * count) of them
        first = (pad // bs if b == 1 else 0)
        assert set(pins[b]) <= set(range(first, -(-n // bs)))
        assert len(pins[b]) == block_budget(SketchWalkConfig(density=case["pinned"]), -(-n // bs) - first, 0) \
            if case["pinned"] else not pins[b]
    for t in range(n, total):
        state.absorb(q[:, :, t : t + 1], k[:, :, t : t + 1])
        rebuilt = DecodeState.from_prefill(
            q[:, :, : t + 1], k[:, :, : t + 1], cfg, 3, key_valid=key_valid[:, : t + 1], kv_tokens=state.kv_tokens
        )
        assert_state_equal(state, rebuilt, cfg, f"after token {t}")
        _, kv_num, kv_idx, kept, causal = decode_select(state, q[:, :, t : t + 1], None)
        bt = t // bs
        for b in range(2):
            chosen = kv_idx[b, : int(kv_num[b])].tolist()
            assert len(set(chosen)) == len(chosen)
            assert all(j <= bt for j in chosen), "selection is not causal"
            assert bt in chosen, "current block missing"
            first = pad // bs if b == 1 else 0
            causal_blocks = list(range(first, bt + 1))
            assert set(chosen) <= set(causal_blocks), "a block of pure padding was selected"
            sinks = causal_blocks[: cfg.sink_blocks]
            assert set(sinks) <= set(chosen), "sink block missing"
            local = [j for j in causal_blocks if j > bt - cfg.local_blocks]
            assert set(pins[b]) <= set(chosen), "pinned prompt block missing"
            forced = len(set(sinks) | set(local) | set(pins[b]))
            assert len(chosen) == block_budget(cfg, len(causal_blocks), forced), "budget not respected"
            assert set(local) <= set(chosen), "local block missing"


# The walk and the decode scoring change which blocks are chosen (the selection is the same code for
# both kernels), the softcap changes the kernel (and the bounds): flex runs every walk with both
# softcaps and both scorings, the Triton kernel (interpreted on CPU, 20 s a case) both softcaps,
# each with a different walk.
_DECODE_CASES = [(w, s, c, "flex", sc) for w, s, sc in [("damped", 1, "bound"), ("one_hop", 1, "sketch"),
                                                        ("damped", 3, "sketch")]
                 for c in (None, 20.0)]
_DECODE_CASES += [("one_hop", 1, None, "triton", "bound"), ("damped", 3, 20.0, "triton", "sketch")]


@pytest.mark.parametrize("walk, walk_steps, softcap, decode_kernel, scoring", _DECODE_CASES,
                         indirect=["decode_kernel"])
def test_decode_steps_match_the_oracle(walk, walk_steps, softcap, decode_kernel, scoring):
    """Three sparse layers, 24 steps across block boundaries, GQA 3, left padding: each step's
    flex output equals SDPA under the step's own selection expanded to a token mask, and the
    walk row handed from layer to layer equals the one computed from rebuilt states."""
    cfg = SketchWalkConfig(decode_dense_steps=0, block_size=16, density=0.3, walk=walk, walk_steps=walk_steps, decode_scoring=scoring,
                           local_blocks=1,  # 5-6 blocks: two local would leave little to select
                           prefill_scoring="bound" if walk == "one_hop" else "sketch")
    n, steps, layers = 70, 24, 3
    total = n + steps
    data = [_qkv(2, 6, 2, total, 16, seed=10 + i) for i in range(layers)]
    key_valid = left_padding(2, total, [0, 21])
    states = [DecodeState.from_prefill(q[:, :, :n], k[:, :, :n], cfg, i, key_valid=key_valid[:, :n])
              for i, (q, k, _) in enumerate(data)]
    for t in range(n, total):
        row = ref_row = None
        for i, (q, k, v) in enumerate(data):
            rebuilt = DecodeState.from_prefill(q[:, :, :t], k[:, :, :t], cfg, i, key_valid=key_valid[:, :t],
                                               kv_tokens=states[i].kv_tokens)
            rebuilt.pinned.copy_(states[i].pinned)  # pins are the prompt's, fixed at its prefill
            rebuilt.absorb(q[:, :, t : t + 1], k[:, :, t : t + 1])
            ref_row, kv_num, kv_idx, _, _ = decode_select(rebuilt, q[:, :, t : t + 1], ref_row, softcap=softcap)
            out, row = sketchwalk_decode(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], states[i], row,
                                         softcap=softcap)
            torch.testing.assert_close(row, ref_row, rtol=0, atol=1e-4)
            mask = _token_mask(kv_idx, kv_num, 16, t + 1, key_valid)
            assert_matches_reference(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], mask, out,
                                     softcap=softcap)
    assert flexwalk.density_report("decode")[2] < 0.6


# triton's interpreter (the Triton kernel on CPU) has no bfloat16: fp16 stands in for it here
@pytest.mark.parametrize("kernel, dtype", [("flex", torch.float32), ("flex", torch.bfloat16),
                                           ("triton", torch.float32), ("triton", torch.float16)])
def test_full_budget_decode_equals_dense(kernel, dtype):
    with flexwalk.options(decode_kernel=kernel):
        _full_budget_decode_equals_dense(dtype)


def _full_budget_decode_equals_dense(dtype):
    cfg = SketchWalkConfig(block_size=32, density=1.0)
    n, total = 100, 140
    q, k, v = (x.to(dtype) for x in _qkv(2, 4, 4, total, 16, seed=5))
    key_valid = left_padding(2, total, [0, 45])
    state = DecodeState.from_prefill(q[:, :, :n], k[:, :, :n], cfg, 2, key_valid=key_valid[:, :n])
    for t in range(n, total):
        out, _ = sketchwalk_decode(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], state)
        dense = key_valid[:, None, None, : t + 1]
        assert_matches_reference(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], dense, out)


def test_static_cache_layout_and_device_position(decode_kernel):
    """A fixed-size cache (static): K/V longer than the sequence, the position passed as a tensor."""
    cfg = SketchWalkConfig(decode_dense_steps=0, block_size=16, density=0.3)
    cap, n = 200, 90
    q, k, v = _qkv(1, 4, 2, cap, 16, seed=6)
    k[:, :, n + 10 :] = 0  # unwritten slots
    v[:, :, n + 10 :] = 0
    state = DecodeState.from_prefill(q[:, :, :n], k[:, :, :n], cfg, 2, kv_tokens=cap, growable=False)
    ref_state = DecodeState.from_prefill(q[:, :, :n], k[:, :, :n], cfg, 2)
    for t in range(n, n + 10):
        out, _ = sketchwalk_decode(q[:, :, t : t + 1], k, v, state, position=torch.tensor(t))
        ref, _ = sketchwalk_decode(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], ref_state)
        torch.testing.assert_close(out, ref, rtol=0, atol=4 * EPS)
    assert int(state.stale_steps) == 0
    with pytest.raises(ValueError, match="fixed cache"):
        state.grow(400)


def test_stale_state_decodes_densely_and_is_counted(decode_kernel):
    """A state continued at the wrong position, or on another sequence's cache, never selects:
    the step is exact dense attention and the stale steps are counted on the device."""
    cfg = SketchWalkConfig(decode_dense_steps=0, block_size=16, density=0.2)
    n = 96
    q, k, v = _qkv(1, 4, 2, n + 4, 16, seed=7)
    state = DecodeState.from_prefill(q[:, :, :n], k[:, :, :n], cfg, 2, kv_tokens=256, growable=False)
    kp = torch.nn.functional.pad(k, (0, 0, 0, 256 - n - 4))
    vp = torch.nn.functional.pad(v, (0, 0, 0, 256 - n - 4))
    # the cache says the new token sits at n + 2, the state expects n: stale
    out, _ = sketchwalk_decode(q[:, :, n + 2 : n + 3], kp, vp, state, position=torch.tensor(n + 2))
    dense = torch.ones(1, 1, 1, n + 3, dtype=torch.bool)
    assert_matches_reference(q[:, :, n + 2 : n + 3], k[:, :, : n + 3], v[:, :, : n + 3], dense, out)
    assert int(state.stale_steps) == 1 and bool(state.stale)
    assert flexwalk.counters()["decode_stale_steps"] == 1

    # another sequence's cache of the same length (growing cache): caught by the key fingerprint
    other_q, other_k, other_v = _qkv(1, 4, 2, n + 1, 16, seed=8)
    state = DecodeState.from_prefill(q[:, :, :n], k[:, :, :n], cfg, 2)
    out, _ = sketchwalk_decode(other_q[:, :, n:], other_k, other_v, state)
    dense = torch.ones(1, 1, 1, n + 1, dtype=torch.bool)
    assert_matches_reference(other_q[:, :, n:], other_k, other_v, dense, out)
    assert int(state.stale_steps) == 1


def test_capacity_grows_in_buckets():
    cfg = SketchWalkConfig(decode_dense_steps=0, block_size=16, density=0.3, prefill_scoring="sketch")  # the state's W_l: the mean-key rule
    q, k, v = _qkv(1, 2, 2, 270, 16, seed=9)
    state = DecodeState.from_prefill(q[:, :, :250], k[:, :, :250], cfg, 2)
    assert state.kv_tokens == 256
    for t in range(250, 270):
        out, row = sketchwalk_decode(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], state)
        assert row.shape == (1, state.capacity)
    assert state.kv_tokens == 512 and state.length == 270
    rebuilt = DecodeState.from_prefill(q, k, cfg, 2, kv_tokens=512)
    assert_state_equal(state, rebuilt, cfg, "after growing")


def test_bad_inputs_name_the_problem():
    cfg = SketchWalkConfig(block_size=16)
    q, k, v = _qkv(1, 2, 2, 40, 16, seed=1)
    state = DecodeState.from_prefill(q[:, :, :30], k[:, :, :30], cfg, 2)
    with pytest.raises(ValueError, match="one new token"):
        sketchwalk_decode(q[:, :, 30:32], k[:, :, :32], v[:, :, :32], state)
    with pytest.raises(ValueError, match="must be in the cache"):
        sketchwalk_decode(q[:, :, 30:31], k[:, :, :30], v[:, :, :30], state)
    with pytest.raises(ValueError, match="walk_row"):
        sketchwalk_decode(q[:, :, 30:31], k[:, :, :31], v[:, :, :31], state, torch.ones(1, 3))
    with pytest.raises(ValueError, match="kv_tokens=10"):
        DecodeState.from_prefill(q[:, :, :30], k[:, :, :30], cfg, 2, kv_tokens=10)
    right = torch.ones(1, 30, dtype=torch.bool)
    right[:, -3:] = False
    with pytest.raises(NotImplementedError, match="right padding"):
        DecodeState.from_prefill(q[:, :, :30], k[:, :, :30], cfg, 2, key_valid=right)


def test_no_recompiles_over_64_decode_steps_after_warmup():
    cfg = SketchWalkConfig(decode_dense_steps=0, block_size=16, density=0.2)
    q, k, v = _qkv(1, 6, 2, 200, 16, seed=11)

    def run(n, steps):
        state = DecodeState.from_prefill(q[:, :, :n], k[:, :, :n], cfg, 2)
        row = None
        for t in range(n, n + steps):
            out, row = sketchwalk_decode(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], state, row)
        return out

    run(60, 2)  # warm-up: one compile for this capacity
    before = dynamo_counters["stats"]["unique_graphs"]
    assert torch.isfinite(run(70, 64)).all()
    assert torch.isfinite(run(101, 64)).all()  # another prompt length, the same capacity bucket
    assert dynamo_counters["stats"]["unique_graphs"] == before, "a decode step or prompt length recompiled flex"


@pytest.mark.parametrize("dense_below", ["auto", 110])
def test_compiled_step_core_matches_eager(dense_below):
    """The step core compiled (as on CUDA) gives the eager selection, state and output; with
    dense_below 110 the batch crosses it mid-run and the padded row (87-106 real tokens) turns
    dense, in both."""
    cfg = SketchWalkConfig(decode_dense_steps=0, block_size=16, density=0.3, dense_below=dense_below)
    q, k, v = _qkv(2, 6, 2, 120, 16, seed=12)
    key_valid = left_padding(2, 120, [0, 13])
    eager = DecodeState.from_prefill(q[:, :, :100], k[:, :, :100], cfg, 2, key_valid=key_valid[:, :100])
    compiled = DecodeState.from_prefill(q[:, :, :100], k[:, :, :100], cfg, 2, key_valid=key_valid[:, :100])
    for t in range(100, 120):
        with flexwalk.options(compile_decode="never"):
            out_e, row_e = sketchwalk_decode(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], eager)
        with flexwalk.options(compile_decode="always"):
            out_c, row_c = sketchwalk_decode(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], compiled)
        torch.testing.assert_close(row_c, row_e, rtol=0, atol=1e-5)
        torch.testing.assert_close(out_c, out_e, rtol=0, atol=1e-5)
    assert_state_equal(compiled, eager, cfg, "compiled vs eager")
    assert flexwalk.counters().get("dense_decode_short_rows", 0) == (0 if dense_below == "auto" else 2 * 11)


def test_cuda_graph_key_and_invalidation():
    """The captured step is specialised to the cache tensors, the optional inputs and options:
    (CPU) logic of the key, and absorb/grow dropping a capture (they replace state tensors)."""
    from flexwalk.decode.step import graph_key, graphable

    k, v = torch.zeros(1, 2, 64, 16), torch.zeros(1, 2, 64, 16)
    kw = dict(scale=None, softcap=None, force_dense=False, kernel="triton", compiled=True)
    base = graph_key(k, v, None, None, torch.tensor(3), kw)
    assert base == graph_key(k, v, None, None, torch.tensor(9), kw)  # a new position value: same graph
    assert base != graph_key(k.clone(), v, None, None, torch.tensor(3), kw)  # another cache
    assert base != graph_key(k, v, torch.ones(1, 4), None, torch.tensor(3), kw)  # a walk row now
    assert base != graph_key(k, v, None, None, None, kw)
    assert base != graph_key(k, v, None, None, torch.tensor(3), {**kw, "force_dense": True})
    cfg = SketchWalkConfig(decode_dense_steps=0, block_size=16)
    q, kk, _ = _qkv(1, 2, 2, 40, 16, seed=1)
    state = DecodeState.from_prefill(q[:, :, :30], kk[:, :, :30], cfg, 2, kv_tokens=64, growable=False)
    assert not graphable(state, q, kw, flexwalk.current_options())  # CPU: never captured
    state.captured_step = object()
    state.absorb(q[:, :, 30:31], kk[:, :, 30:31])
    assert state.captured_step is None
    state2 = DecodeState.from_prefill(q[:, :, :30], kk[:, :, :30], cfg, 2)
    state2.captured_step = object()
    state2.grow(1024)
    assert state2.captured_step is None


def test_decode_mask_mod_carries_the_selection():
    """The decode BlockMask's mask_mod holds the selection itself: flex_attention without
    compile (what dynamo falls back to past its recompile limit) reads only the mask_mod and
    ignores the block tables, so a bounds-only mask_mod would attend densely there."""
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    from flexwalk.kernels.flex import decode_block_mask

    g = torch.Generator().manual_seed(3)
    bsz, bs, s, d = 2, 16, 96, 8
    kv_idx = torch.tensor([[4, 0, 2, 1, 3, 5], [1, 5, 0, 2, 3, 4]], dtype=torch.int32)
    kv_num = torch.tensor([3, 2], dtype=torch.int32)
    start, end = torch.tensor([0, 5], dtype=torch.int32), torch.tensor(90, dtype=torch.int32)
    bm = decode_block_mask(kv_num, kv_idx, start, end, rows=1, kv_tokens=s, block_size=bs)
    q, k, v = (torch.randn(bsz, 1, n, d, generator=g) for n in (1, s, s))
    pos = torch.arange(s)
    allowed = torch.zeros(bsz, s, dtype=torch.bool)
    for b in range(bsz):
        for j in kv_idx[b, : kv_num[b]].tolist():
            allowed[b, j * bs : (j + 1) * bs] = True
    allowed &= (pos >= start[:, None]) & (pos < end)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None, None, :])
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        eager = flex_attention(q, k, v, block_mask=bm)
    assert (eager - ref).abs().max() <= 1e-5 < (dense - ref).abs().max()


def _block_mass_reference(q, k, bs, t, scale, softcap, key_valid):
    """prompt_block_mass written densely: full softmax of the last t queries, GQA expanded."""
    bsz, hq, lq, _ = q.shape
    n, g = k.shape[2], hq // k.shape[1]
    kk = k.repeat_interleave(g, 1)
    s = (q[:, :, lq - t:] @ kk.transpose(-1, -2)) * scale  # [B, Hq, t, n]
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    qpos = torch.arange(n - t, n)
    ok = torch.arange(n)[None, :] <= qpos[:, None]
    ok = ok[None, None] & key_valid[:, None, None, :]
    p = torch.softmax(s.masked_fill(~ok, float("-inf")), -1).nan_to_num(0.0)
    nb = -(-n // bs)
    p = torch.nn.functional.pad(p, (0, nb * bs - n)).reshape(bsz, hq, t, nb, bs).sum(-1)
    w = key_valid[:, n - t:].to(p.dtype)
    return ((p * w[:, None, :, None]).sum(2) / w.sum(-1).clamp_min(1)[:, None, None]).mean(1)


@given(n=st.integers(1, 150), bs=st.sampled_from([16, 32]), lq=st.integers(1, 40), pad=st.integers(0, 60),
       softcap=st.sampled_from([None, 5.0]), seed=st.integers(0, 3))
def test_prompt_block_mass_equals_dense_softmax(n, bs, lq, pad, softcap, seed):
    """The pinned blocks' score (exact mass from the last queries, chunked over keys, GQA 3,
    left padding, softcap) equals a dense softmax written out; tolerance: the fp32
    reference's own error against fp64."""
    from flexwalk.decode.scoring import prompt_block_mass

    lq = min(lq, n)
    q, k, _ = _qkv(2, 6, 2, n, 8, seed)
    q = q[:, :, n - lq:] * 2
    key_valid = left_padding(2, n, [0, min(pad, n - 1)])
    got = prompt_block_mass(q, k, block_size=bs, scale=8**-0.5, softcap=softcap, key_valid=key_valid,
                            chunk_bytes=4 * 2 * 6 * bs * 3)  # chunks of a few blocks, the last one partial
    t = min(lq, bs)
    ref64 = _block_mass_reference(q.double(), k.double(), bs, t, 8**-0.5, softcap, key_valid)
    ref32 = _block_mass_reference(q, k, bs, t, 8**-0.5, softcap, key_valid)
    tol = 4 * (ref32.double() - ref64).abs().max().item() + 8 * EPS
    assert got.shape == ref64.shape
    assert (got.double() - ref64).abs().max().item() <= tol
    torch.testing.assert_close(got.sum(-1).double(), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-5)


def test_pinned_blocks_survive_decode_and_growth():
    """The prompt's pins are its top-mass blocks (a planted needle block among them), stay kept
    in every step while the walk's own choice moves, and survive a capacity growth."""
    cfg = SketchWalkConfig(decode_dense_steps=0, block_size=16, density=0.2, decode_pinned=0.1)
    n, total = 250, 330
    q, k, v = _qkv(1, 4, 2, total, 16, seed=5)
    q[:, :, n - 16 : n] = q[:, :, n - 1 : n]  # the prompt's last queries all ask for ...
    k[:, :, 100:104] = q[:, :, n - 1 : n].reshape(1, 2, 2, 16).mean(2, keepdim=True) * 4  # ... a needle in block 6
    state = DecodeState.from_prefill(q[:, :, :n], k[:, :, :n], cfg, 3)
    capacity = state.capacity
    pins = torch.nonzero(state.pinned[0]).flatten().tolist()
    assert len(pins) == 2 and 6 in pins  # ceil(0.1 * 16 blocks)
    chosen_sets = set()
    for t in range(n, total):
        sketchwalk_decode(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], state)
        _, kv_num, kv_idx, _, _ = decode_select(state, q[:, :, t : t + 1], None)  # the step's own selection
        chosen = kv_idx[0, : int(kv_num[0])].tolist()
        assert set(pins) <= set(chosen), f"step {t} dropped a pinned block"
        chosen_sets.add(tuple(sorted(chosen)))
    assert len(chosen_sets) > 1  # the rest of the selection does move
    assert state.capacity > capacity, "the test should cross a capacity growth"
    assert torch.nonzero(state.pinned[0]).flatten().tolist() == pins


@given(n=st.integers(1, 120), bs=st.sampled_from([16, 32]), pad=st.integers(0, 50),
       softcap=st.sampled_from([None, 5.0]), seed=st.integers(0, 3))
def test_key_bounds_are_block_extremes_and_bound_every_logit(n, bs, pad, softcap, seed):
    """decode_scoring="bound": block_key_bounds are the channel-wise extremes of each block's
    real keys (left padding out, empty blocks +-inf), and every real key's logit, for every
    query head of its KV head (GQA 3, softcap), is at most its block's bound logit.  Tolerance:
    fp32 rounding of a D-term dot product summed in another order."""
    from flexwalk.decode.scoring import bound_logits
    from flexwalk.selection.sketch import block_key_bounds

    q, k, _ = _qkv(2, 6, 2, n, 8, seed)
    q = q[:, :, -1:] * 3
    key_valid = left_padding(2, n, [0, min(pad, n - 1)])
    kmax, kmin = block_key_bounds(k, bs, key_valid)
    nb = -(-n // bs)
    for b in range(2):
        for j in range(nb):
            real = key_valid[b, j * bs : (j + 1) * bs]
            kb = k[b, :, j * bs : (j + 1) * bs][:, real]  # [Hkv, m, D]
            if kb.shape[1] == 0:
                assert torch.isinf(kmax[b, :, j]).all() and (kmax[b, :, j] < 0).all() and (kmin[b, :, j] > 0).all()
            else:
                assert torch.equal(kmax[b, :, j], kb.amax(1)) and torch.equal(kmin[b, :, j], kb.amin(1))
    live = torch.isfinite(kmax[:, 0, :, 0])  # [B, nb]
    scale = 8**-0.5
    bound = bound_logits(q, torch.cat([kmax, -kmin], -1), live, scale, softcap)  # [B, Hkv, G, nb]
    logits = (q.reshape(2, 2, 3, 1, 8) * k[:, :, None]).sum(-1) * scale  # [B, Hkv, G, n]
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    tol = 8 * 8 * EPS * scale * (q.abs().amax() * k.abs().amax()).item()
    block_of = torch.arange(n) // bs
    for b in range(2):
        real = key_valid[b]
        gap = logits[b][..., real] - bound[b][..., block_of[real]]
        assert gap.max().item() <= tol, f"a logit exceeds its block's bound by {gap.max().item():.3g}"
    assert (bound[~live[:, None, None, :].expand_as(bound)] == 0).all()


def test_bound_scoring_finds_needles_the_block_mean_loses():
    """Keys near a shared direction (as a model's are), one needle key in block 6 that the decode
    query asks for, over 10 draws: the block's mean key dilutes the needle 16 times, its
    extremes keep it.  The 'bound' row ranks the needle block first every time; the 'sketch'
    row (block means) drops it from the 20% budget at least once."""
    n, d, bs = 256, 16, 16
    kept = {"bound": 0, "sketch": 0}
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        base = torch.randn(1, 2, 1, d, generator=g)
        k = base + 0.5 * torch.randn(1, 2, n + 1, d, generator=g)
        q = torch.randn(1, 4, n + 1, d, generator=g)
        needle = torch.randn(2, d, generator=g)
        k[0, :, 100] = base[0, :, 0] + needle
        q[0, :, n] = needle.repeat_interleave(2, 0)  # each query head asks its KV head's needle
        for scoring in kept:
            cfg = SketchWalkConfig(decode_dense_steps=0, block_size=bs, density=0.2, decode_scoring=scoring, decode_pinned=0.0,
                                   walk="one_hop")
            state = DecodeState.from_prefill(q[:, :, :n], k[:, :, :n], cfg, 3)
            state.absorb(q[:, :, n : n + 1], k[:, :, n : n + 1])
            row, kv_num, kv_idx, _, _ = decode_select(state, q[:, :, n : n + 1], None)
            kept[scoring] += 6 in kv_idx[0, : int(kv_num[0])].tolist()
            if scoring == "bound":
                assert int(row[0, :16].argmax()) == 6, f"draw {seed}: the needle block is not ranked first"
    assert kept["bound"] == 10 and kept["sketch"] < 10, kept


def test_a_padded_row_shorter_than_dense_below_decodes_dense(decode_kernel):
    """A batch 100 tokens wide, row 1 left-padded to 40 real tokens, dense_below 64, density 0.2:
    while row 1 has fewer than 64 real tokens its steps attend every causal block (equal to dense
    attention over its real keys), counted per step; row 0 decodes as it would alone.  A batch
    narrower than dense_below keeps every row sparse (the callers decode it dense)."""
    cfg = SketchWalkConfig(decode_dense_steps=0, block_size=16, density=0.2, dense_below=64)
    n, steps, short = 100, 30, 40
    total = n + steps
    q, k, v = _qkv(2, 4, 2, total, 16, seed=31)
    key_valid = left_padding(2, total, [0, n - short])
    state = DecodeState.from_prefill(q[:, :, :n], k[:, :, :n], cfg, 2, key_valid=key_valid[:, :n])
    alone = DecodeState.from_prefill(q[:1, :, :n], k[:1, :, :n], cfg, 2)
    flexwalk.reset_counters()
    dense_steps = 0
    for t in range(n, total):
        cut = slice(0, t + 1)
        out, _ = sketchwalk_decode(q[:, :, t:t + 1], k[:, :, cut], v[:, :, cut], state)
        ref, _ = sketchwalk_decode(q[:1, :, t:t + 1], k[:1, :, cut], v[:1, :, cut], alone)
        torch.testing.assert_close(out[:1], ref, rtol=0, atol=4 * EPS * max(1.0, ref.abs().max().item()))
        if short + (t - n) + 1 < cfg.dense_below:
            dense_steps += 1
            assert_matches_reference(q[1:, :, t:t + 1], k[1:, :, cut], v[1:, :, cut],
                                     key_valid[1:, None, None, cut], out[1:])
    assert dense_steps == 23 and flexwalk.counters()["dense_decode_short_rows"] == dense_steps
    narrow = DecodeState.from_prefill(q[:, :, :50], k[:, :, :50], cfg, 2, key_valid=left_padding(2, 50, [0, 30]))
    flexwalk.reset_counters()
    sketchwalk_decode(q[:, :, 50:51], k[:, :, :51], v[:, :, :51], narrow)
    assert "dense_decode_short_rows" not in flexwalk.counters()


def test_the_first_decode_dense_steps_attend_every_block_then_select(decode_kernel):
    """decode_dense_steps=3: the three steps after the prefill equal dense attention and are
    counted; from the fourth the steps equal those of a state without the setting (the state
    update does not depend on it) and keep fewer blocks than the causal ones."""
    cfg = SketchWalkConfig(block_size=16, density=0.2, decode_dense_steps=3)
    plain = SketchWalkConfig(decode_dense_steps=0, block_size=16, density=0.2)
    n, steps = 160, 8
    q, k, v = _qkv(1, 4, 2, n + steps, 16, seed=41)
    state = DecodeState.from_prefill(q[:, :, :n], k[:, :, :n], cfg, 2)
    ref_state = DecodeState.from_prefill(q[:, :, :n], k[:, :, :n], plain, 2)
    flexwalk.reset_counters()
    for t in range(n, n + steps):
        cut = slice(0, t + 1)
        out, row = sketchwalk_decode(q[:, :, t:t + 1], k[:, :, cut], v[:, :, cut], state)
        sparse_step = flexwalk.density_report("decode")[2] < 0.5  # this step's kept / causal blocks
        ref, ref_row = sketchwalk_decode(q[:, :, t:t + 1], k[:, :, cut], v[:, :, cut], ref_state)
        torch.testing.assert_close(row, ref_row, rtol=0, atol=0)
        if t - n < 3:
            dense = torch.ones(1, 1, 1, t + 1, dtype=torch.bool)
            assert_matches_reference(q[:, :, t:t + 1], k[:, :, cut], v[:, :, cut], dense, out)
        else:
            torch.testing.assert_close(out, ref, rtol=0, atol=0)
        assert sparse_step == (t - n >= 3)
    assert flexwalk.counters()["dense_decode_first"] == 3
