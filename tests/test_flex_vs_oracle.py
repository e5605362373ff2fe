"""The compiled flex path computes exactly what the eager oracle defines."""

import functools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flexwalk
from conftest import assert_matches_reference, floor_tol, left_padding, random_qkv
from flexwalk import SketchWalkConfig, dense_attention, eager_sketchwalk_attention, sketchwalk_attention, token_mask
from flexwalk.prefill import dense_tail_start, rows_dropped
from flexwalk.reference import reference_error_budget, rows_error_budget, sample_rows
from flexwalk.selection.driver import fused_selection_mask


def sparse_cfg(**kw):
    base = dict(dense_layers=0, dense_below=0, sketch_dim=16)
    base.update(kw)
    return SketchWalkConfig(**base)


@settings(max_examples=15)  # each example compiles its own kernels (about 5 s on 2 CPU cores)
@given(
    n=st.integers(33, 333),
    bs=st.sampled_from([16, 32, 64]),
    hkv=st.sampled_from([1, 2, 3]),
    g=st.sampled_from([1, 2, 3]),
    batch=st.sampled_from([1, 2]),
    density=st.floats(0.05, 1.0),
    walk=st.sampled_from(["walk", "damped", "one_hop"]),
    pad=st.integers(0, 100),
    seed=st.integers(0, 10_000),
)
def test_flex_equals_oracle(n, bs, hkv, g, batch, density, walk, pad, seed):
    cfg = sparse_cfg(block_size=bs, density=density, walk=walk, dense_tail_blocks=seed % 3)
    _check_flex_against_the_oracle(cfg, n, hkv, g, batch, pad, seed)


def _check_flex_against_the_oracle(cfg, n, hkv, g, batch, pad, seed):
    """Two layers (walk carried) of compiled flex against the oracle's token mask of the same
    selection, through SDPA; the walk equals the eager one."""
    flexwalk.reset_counters()
    # the dense tail inside the block-sparse kernel and apart
    with flexwalk.options(split_dense_tail="always" if seed % 2 else "never"):
        _flex_against_the_oracle(cfg, n, hkv, g, batch, pad, seed)


def _flex_against_the_oracle(cfg, n, hkv, g, batch, pad, seed):
    pad = min(pad, n - 1) if batch == 2 else 0
    q, k, v = random_qkv(batch, hkv * g, hkv, n, 16, seed=seed)
    kv = left_padding(batch, n, [0, pad][:batch]) if pad else None
    st_f = st_o = None
    for layer in range(2):
        out, st_f = sketchwalk_attention(q, k, v, cfg, layer, st_f, key_valid=kv)
        ref, st_o, sel = eager_sketchwalk_attention(q, k, v, cfg, layer, st_o, key_valid=kv)
        assert sel.mask.shape[1:] == (-(-n // cfg.q_block), -(-n // cfg.block_size))
        assert torch.isfinite(out).all()
        mask = token_mask(n, selection=sel, key_valid=kv)
        real = slice(None) if kv is None else kv[-1]
        # compare real query rows (padding rows attend to themselves only)
        assert_matches_reference(q[..., real, :], k, v, mask[..., real, :], out[..., real, :])
        assert torch.equal(st_f.transition, st_o.transition)
    assert flexwalk.counters()["sparse_prefill"] == 2


@settings(max_examples=15)
@given(
    n=st.integers(33, 300),
    bs=st.sampled_from([16, 32]),
    m=st.sampled_from([2, 4]),
    hkv=st.sampled_from([1, 2]),
    g=st.sampled_from([1, 3]),
    batch=st.sampled_from([1, 2]),
    density=st.floats(0.05, 1.0),
    pad=st.integers(0, 100),
    seed=st.integers(0, 10_000),
)
def test_pooled_query_blocks_flex_equals_oracle(n, bs, m, hkv, g, batch, density, pad, seed):
    """query_block_size = m * block_size: the compiled flex kernel (query blocks of m * bs rows, key
    blocks of bs) computes the oracle's token mask of the same selection; the walk is the eager one."""
    cfg = sparse_cfg(block_size=bs, query_block_size=bs * m, density=density, dense_tail_blocks=seed % 2)
    _check_flex_against_the_oracle(cfg, n, hkv, g, batch, pad, seed)


@pytest.mark.parametrize("tail, qbs, pad", [(1, None, 0), (2, 64, 0), (1, None, 50), (2, 64, 50)])
def test_the_dense_tail_runs_outside_the_block_sparse_kernel(tail, qbs, pad):
    """The tail's query blocks visit no key block in the block-sparse flex call (its longest
    programs, computed by a dense call of their own, counted as dense_tail_split); every other
    row keeps the selection's blocks; the output is the oracle's."""
    n = 300
    q, k, v = random_qkv(2, 4, 2, n, 16, seed=11)
    kv = left_padding(2, n, [0, pad]) if pad else None
    cfg = sparse_cfg(block_size=32, query_block_size=qbs, density=0.2, dense_tail_blocks=tail)
    with flexwalk.options(split_dense_tail="always") as opts:  # the CUDA default, here on the CPU
        out, _ = sketchwalk_attention(q, k, v, cfg, 0, key_valid=kv)
        assert flexwalk.counters()["dense_tail_split"] == 1 and flexwalk.counters()["sparse_prefill"] == 1
        bm, _, _, _ = fused_selection_mask(q, k, cfg, 0, None, key_valid=kv)
        r0 = -(-n // cfg.q_block) - tail
        assert r0 == dense_tail_start(cfg, n, "cpu") == dense_tail_start(cfg, n, q.device, opts)
    sparse = rows_dropped(bm, r0)  # the mask of the block-sparse call
    assert sparse.seq_lengths == bm.seq_lengths
    visits = sparse.kv_num_blocks + sparse.full_kv_num_blocks
    assert (visits[..., r0:] == 0).all()
    assert torch.equal(visits[..., :r0], (bm.kv_num_blocks + bm.full_kv_num_blocks)[..., :r0])
    assert ((bm.kv_num_blocks + bm.full_kv_num_blocks)[..., r0:-(-n // cfg.q_block)] > 0).all()
    ref, _, sel = eager_sketchwalk_attention(q, k, v, cfg, 0, key_valid=kv)
    real = slice(None) if kv is None else kv[-1]
    mask = token_mask(n, selection=sel, key_valid=kv)
    assert_matches_reference(q[..., real, :], k, v, mask[..., real, :], out[..., real, :])


def test_the_dense_tail_is_split_where_the_setting_says():
    cfg = sparse_cfg(block_size=32, dense_tail_blocks=1)
    assert flexwalk.current_options().split_dense_tail == "cuda"
    n = flexwalk.current_options().split_dense_tail_min_tokens
    assert dense_tail_start(cfg, n, "cuda") == n // 32 - 1 and dense_tail_start(cfg, n, "cpu") is None
    assert dense_tail_start(cfg, n - 1, "cuda") is None  # short prompts: the launches cost more than the tail
    assert dense_tail_start(cfg.replace(dense_tail_blocks=0), n, "cuda") is None
    with flexwalk.options(split_dense_tail="never"):
        assert dense_tail_start(cfg, n, "cuda") is None
    with flexwalk.options(split_dense_tail_min_tokens=n // 2):
        assert dense_tail_start(cfg, n // 2, "cuda") == n // 64 - 1


def test_a_dense_tail_longer_than_the_prompt_is_dense_attention():
    n = 200
    q, k, v = random_qkv(1, 4, 2, n, 16, seed=12)
    with flexwalk.options(split_dense_tail="always"):
        out, _ = sketchwalk_attention(q, k, v, sparse_cfg(block_size=32, density=0.1, dense_tail_blocks=50), 0)
        assert dense_tail_start(sparse_cfg(block_size=32, dense_tail_blocks=50), n, "cpu") == 0
    assert_matches_reference(q, k, v, token_mask(n, batch=1), out)


@pytest.mark.parametrize("pad", [0, 70])
def test_query_block_size_equal_to_block_size_gives_the_same_output(pad):
    """query_block_size=None and == block_size: the same BlockMask and bit-identical outputs."""
    n = 300
    q, k, v = random_qkv(2, 4, 2, n, 16, seed=8)
    kv = left_padding(2, n, [0, pad]) if pad else None
    cfg = sparse_cfg(block_size=32, density=0.3)
    sa = sb = None
    for layer in range(2):
        a, sa = sketchwalk_attention(q, k, v, cfg, layer, sa, key_valid=kv)
        b, sb = sketchwalk_attention(q, k, v, cfg.replace(query_block_size=32), layer, sb, key_valid=kv)
        assert torch.equal(a, b) and torch.equal(sa.transition, sb.transition)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_full_budget_equals_dense_sdpa(dtype):
    q, k, v = random_qkv(2, 6, 2, 301, 32, dtype=dtype, seed=4)
    cfg = sparse_cfg(block_size=32, density=1.0)
    out, _ = sketchwalk_attention(q, k, v, cfg, 0)
    assert out.dtype == dtype
    mask = token_mask(301, batch=2)
    assert_matches_reference(q, k, v, mask, out)
    assert flexwalk.counters() == {"sparse_prefill": 1}


def test_sparse_budget_really_differs_from_dense():
    q, k, v = random_qkv(1, 4, 4, 1024, 32, seed=5)
    out, _ = sketchwalk_attention(q, k, v, sparse_cfg(block_size=32, density=0.2), 0)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (out - dense).abs().max() > 1e-2
    assert flexwalk.density_report()[0] < 0.5


def test_softcap_and_scale_follow_the_oracle():
    q, k, v = random_qkv(1, 4, 2, 200, 16, seed=6)
    cfg = sparse_cfg(block_size=16, density=0.4)
    out, _ = sketchwalk_attention(q * 4, k * 4, v, cfg, 0, softcap=5.0, scale=0.3)
    ref, _, sel = eager_sketchwalk_attention(q * 4, k * 4, v, cfg, 0, softcap=5.0, scale=0.3)
    assert_matches_reference(q * 4, k * 4, v, token_mask(200, selection=sel), out, scale=0.3, softcap=5.0)


# A window is a constant of the compiled kernel (one compile each, about 5 s on 2 cores): 12
# examples over windows shorter than, equal to, just past and several times the block (32).
@settings(max_examples=12)
@given(n=st.integers(20, 300), window=st.sampled_from([1, 7, 31, 32, 33, 64, 100, 120]), pad=st.integers(0, 50),
       offset=st.integers(0, 90))
def test_dense_window_padding_and_offset_masks(n, window, pad, offset):
    """dense_attention (sliding windows, padding, queries after a cached prefix) vs token masks."""
    L = max(1, n - offset)
    pad = min(pad, n - 1)
    q, k, v = random_qkv(2, 4, 2, n, 16, seed=n * 7 + window)
    q = q[:, :, n - L :]
    kv = left_padding(2, n, [0, pad])
    out = dense_attention(q, k, v, key_valid=kv, window=window, q_offset=n - L, block_size=32)
    full = token_mask(n, batch=2, key_valid=kv, window=window)
    mask = full[:, :, n - L :]
    rows = kv[1, n - L :]
    assert_matches_reference(q[..., rows, :], k, v, mask[..., rows, :], out[..., rows, :])


def test_functional_api_routes_dense_paths_observably():
    q, k, v = random_qkv(1, 2, 2, 100, 16)
    cfg = SketchWalkConfig(dense_layers=1, dense_below=64, block_size=16)
    sketchwalk_attention(q, k, v, cfg, 0)
    sketchwalk_attention(q, k, v, cfg, 1)
    sketchwalk_attention(q[:, :, :50], k[:, :, :50], v[:, :, :50], cfg, 1)
    sketchwalk_attention(q, k, v, cfg, 2, window=20)
    assert flexwalk.counters() == {"dense_layer": 1, "sparse_prefill": 1, "dense_short": 1, "sliding_window": 1}


def test_bad_inputs_name_the_problem():
    q, k, v = random_qkv(1, 4, 2, 64, 16)
    cfg = sparse_cfg(block_size=16)
    with pytest.raises(ValueError, match=r"multiple of key/value heads"):
        sketchwalk_attention(q[:, :3], k, v, cfg, 0)
    with pytest.raises(ValueError, match=r"\[batch, heads, seq, head_dim\]"):
        sketchwalk_attention(q[0], k, v, cfg, 0)
    with pytest.raises(ValueError, match=r"layer_idx=-1"):
        sketchwalk_attention(q, k, v, cfg, -1)
    with pytest.raises(ValueError, match=r"key_valid must be"):
        sketchwalk_attention(q, k, v, cfg, 0, key_valid=torch.ones(1, 63, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"q has 32 tokens but k has 64"):
        sketchwalk_attention(q[:, :, :32], k, v, cfg, 0)
    with pytest.raises(TypeError, match="SketchWalkConfig"):
        sketchwalk_attention(q, k, v, {"density": 0.2}, 0)


def test_cpu_backward_is_refused_with_a_clear_error():
    q, k, v = random_qkv(1, 2, 2, 100, 16)
    q.requires_grad_(True)
    with pytest.raises(NotImplementedError, match="backward"):
        sketchwalk_attention(q, k, v, sparse_cfg(block_size=16), 0)
    with torch.no_grad():
        assert torch.isfinite(sketchwalk_attention(q, k, v, sparse_cfg(block_size=16), 0)[0]).all()


@given(n=st.integers(65, 700), bs=st.sampled_from([16, 32, 64]), m=st.sampled_from([1, 2, 4]),
       density=st.floats(0.05, 0.6), window=st.sampled_from([None, 48]), seed=st.integers(0, 10_000))
def test_kernel_mask_mod_agrees_with_the_full_one_on_every_visited_block(n, bs, m, density, window, seed):
    """The compiled kernel's cheap mask_mod (no selection, no bounds) equals the full one on
    every element of every partial block of a padding-free selection, for the rows kept; and
    (ROWS_GUARANTEED_SAFE) each real query block's first partial block holds the block's
    first key position, which every row of the block attends.  Query blocks of m * bs rows."""
    from flexwalk.kernels.flex import bucket_length, kernel_mask_mod, selection_block_mask
    from flexwalk.selection.driver import sketchwalk_selection

    qb = min(bs * m, 256)
    q, k, _ = random_qkv(1, 2, 1, n, 16, seed=seed)
    sel, _ = sketchwalk_selection(q, k, sparse_cfg(block_size=bs, query_block_size=qb, density=density), 0)
    bm = selection_block_mask(sel, window=window)
    assert bm.BLOCK_SIZE == (qb, bs)
    fast = kernel_mask_mod(window=window)
    cnt, idx = bm.kv_num_blocks[0, 0], bm.kv_indices[0, 0]
    zero = torch.zeros((), dtype=torch.int64)
    visited = 0
    nq = -(-n // qb)
    assert int(cnt[nq:].sum()) == 0  # query blocks of the bucket padding visit nothing
    for i in range(nq):
        rows = torch.arange(i * qb, min((i + 1) * qb, n))[:, None]
        if window is None:  # (sparse prefill has no window) first visited: the block's first keys
            assert int(cnt[i]) >= 1 and int(idx[i, 0]) * bs == i * qb
        for j in idx[i, : int(cnt[i])].tolist():
            cols = torch.arange(j * bs, (j + 1) * bs)[None, :]
            assert torch.equal(bm.mask_mod(zero, zero, rows, cols), fast(zero, zero, rows, cols)), (i, j)
            visited += 1
    assert visited >= -(-n // bs)  # every real row's diagonal key blocks at least


def test_kernel_mask_mod_is_not_used_where_flex_would_run_eagerly():
    """Forced-eager or disabled dynamo runs flex's unfused path, which evaluates mask_mod on every
    element: there the full mask_mod (selection included) must be used, or the layer would be dense."""
    from flexwalk.kernels.flex import kernel_mask_ok

    q, k, v = random_qkv(1, 4, 2, 300, 16, seed=4)
    cfg = sparse_cfg(block_size=32, density=0.2)
    ref, _, sel = eager_sketchwalk_attention(q, k, v, cfg, 0)
    mask = token_mask(300, selection=sel)
    assert kernel_mask_ok()
    with torch.compiler.set_stance("force_eager"):
        assert not kernel_mask_ok()
        out, _ = sketchwalk_attention(q, k, v, cfg, 0)
    assert_matches_reference(q, k, v, mask, out)
    with torch._dynamo.config.patch(disable=True):  # (flex itself refuses to run then)
        assert not kernel_mask_ok()


def test_the_kernel_mask_path_compiles_once_per_shape():
    """Each padding-free sparse flex signature has a compiled function of its own, compiled once:
    dynamo's recompile limit (past which flex would run eagerly) is never approached.

    The test starts from an empty table, so that it judges only its own calls: functions compiled
    by earlier tests in the same process can hold a second entry that is no fault of the key (torch
    guards every compiled frame on the number of registered pytree node types, and transformers
    registers its cache classes on first use, which recompiles each function once)."""
    from flexwalk.kernels.flex import bucket_length, clear_flex_functions, flex_functions

    clear_flex_functions()
    cfg = sparse_cfg(block_size=32, density=0.3)
    lengths = (300, 310, 600, 300, 700)
    for n in lengths:
        q, k, v = random_qkv(1, 4, 2, n, 16, seed=n)
        sketchwalk_attention(q, k, v, cfg, 0)
    table = flex_functions()
    assert len(table) == len({bucket_length(n) for n in lengths})  # one function per length bucket
    for fn in table.values():
        code = fn._torchdynamo_orig_callable.__code__
        assert len(torch._dynamo.eval_frame._debug_get_cache_entry_list(code)) <= 1


def test_kernel_tiles_divide_the_mask_blocks():
    """CUDA tiles (BLOCK_M x BLOCK_N) for (query block x key block) masks: they must divide them,
    and 128-row tiles over 64-key blocks are what query_block_size=128 with block_size=64 is for."""
    from flexwalk.kernels.flex import flex_kernel_options
    from flexwalk.kernels.triton_runtime import HOPPER_SMEM

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    opts = functools.partial(flex_kernel_options, smem=HOPPER_SMEM)
    assert opts(64, cpu, q_block=128) is None
    assert opts(64, cuda) == {"BLOCK_M": 64, "BLOCK_N": 64}  # square blocks: as before
    assert opts(128, cuda) is None and opts(256, cuda) is None
    assert opts(64, cuda, q_block=128) == {"BLOCK_M": 128, "BLOCK_N": 64}
    assert opts(16, cuda, q_block=32) == {"BLOCK_M": 32, "BLOCK_N": 16}
    assert opts(64, cuda, q_block=256) == {"BLOCK_M": 128, "BLOCK_N": 64}  # two tiles per block
    assert opts(128, cuda, q_block=256) is None  # triton's tiles (<= 128) divide both
    assert opts(32, cuda, rows_safe=True, q_block=128) == {"BLOCK_M": 128, "BLOCK_N": 32,
                                                           "ROWS_GUARANTEED_SAFE": True}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("block,q_block", [(16, 32), (32, 128), (64, 64), (64, 128), (64, 256)])
def test_flex_tiles_fit_hopper_shared_memory(dtype, head_dim, block, q_block):
    """Every forced flex launch fits a Hopper GPU's shared memory by the kernel's formula, keeping
    flex's three stages wherever they fit and its tiles dividing the
    mask's blocks; float32 at head dim 256 with 64 x 64 tiles (344064 bytes at three stages, an
    H100 compiled 344320 and refused it) drops to two."""
    from flexwalk.kernels.flex import FLEX_STAGES, flex_kernel_options
    from flexwalk.kernels.triton_prefill import SMEM_MARGIN, shared_memory
    from flexwalk.kernels.triton_runtime import HOPPER_SMEM

    opts = flex_kernel_options(block, torch.device("cuda"), dtype=dtype, head_dim=head_dim, q_block=q_block,
                               smem=HOPPER_SMEM)
    bm, bn, stages = opts["BLOCK_M"], opts["BLOCK_N"], opts.get("num_stages", FLEX_STAGES)
    assert min(q_block, 128) % bm == 0 and block % bn == 0
    assert shared_memory(dtype, head_dim, bm, bn, stages) <= HOPPER_SMEM - SMEM_MARGIN
    if dtype != torch.float32:  # 16-bit keeps its tiles, pipelined (3 stages but at head dim 256 over 128 rows)
        assert (bm, bn) == (min(q_block, 128), block) and stages >= 2
    if (dtype, head_dim, block, q_block) == (torch.float32, 256, 64, 64):
        assert shared_memory(dtype, head_dim, 64, 64, 3) == 344064
        assert (bm, bn, stages) == (64, 64, 2)

def test_the_oracle_on_sampled_rows_is_the_full_oracle_on_those_rows():
    """rows_error_budget (the oracle of prompts too long for an n x n mask) agrees with the full
    reference check on the same rows, chunk by chunk, and catches one wrong row among them."""
    n = 700
    q, k, v = random_qkv(2, 4, 2, n, 16, seed=3)
    cfg = sparse_cfg(block_size=32, density=0.25)
    out, _ = sketchwalk_attention(q, k, v, cfg, 0)
    _, _, sel = eager_sketchwalk_attention(q, k, v, cfg, 0)
    rows = sample_rows(n, count=64)
    assert 48 < len(rows) <= 64 and rows[0] == 0 and rows[-16:].tolist() == list(range(n - 16, n))
    assert torch.equal(sample_rows(50), torch.arange(50))
    mask_of = lambda r: token_mask(n, selection=sel, rows=r)  # noqa: E731
    err, budget = rows_error_budget(q, k, v, out, mask_of, rows)
    whole = reference_error_budget(q[:, :, rows], k, v, token_mask(n, selection=sel)[:, :, rows], out[:, :, rows])
    assert (err, budget) == pytest.approx(whole) and err <= budget
    err8, budget8 = rows_error_budget(q, k, v, out, mask_of, rows, chunk=8)
    assert err8 <= err and err8 / budget8 >= err / budget - 1e-12  # the worst chunk, not a better one
    wrong = out.clone()
    wrong[1, :, rows[40]] += 0.01
    err, budget = rows_error_budget(q, k, v, wrong, mask_of, rows, chunk=8)
    assert err > budget


@pytest.mark.parametrize("kernel", ["flex", "triton", "triton+selection"])
@pytest.mark.parametrize("keep_sketch", [False, True])
def test_a_padded_row_shorter_than_dense_below_runs_dense_as_alone(kernel, keep_sketch):
    """A batch of a 240-token prompt and a 90-token one left-padded to 240, dense_below 128: the
    long row selects as it would alone; the short row keeps every causal block, its output
    equal to its own run (dense: it is below dense_below) and to dense SDPA; counted per row
    and layer.  Over three layers, the walk carried.  triton+selection: the Triton selection too
    (where the sketch is not kept)."""
    from flexwalk.kernels import triton_prefill as TP
    from flexwalk.selection.sketch import layer_sketch

    if kernel != "flex" and not TP.HAS_TRITON:
        pytest.skip("triton is not installed")
    n, short = 240, 90
    cfg = SketchWalkConfig(block_size=16, density=0.2, dense_layers=0, dense_below=128, sketch_dim=16)
    kv = left_padding(2, n, [0, n - short])
    flexwalk.reset_counters()
    state = alone_state = None
    opts = dict(prefill_kernel=kernel.split("+")[0], triton_selection_on_cpu=kernel.endswith("selection"))
    with flexwalk.options(**opts):
        for layer in range(3):
            q, k, v = random_qkv(2, 4, 2, n, 16, seed=20 + layer)
            sk = layer_sketch(q, k, cfg, layer, key_valid=kv) if keep_sketch else None
            out, state = sketchwalk_attention(q, k, v, cfg, layer, state, key_valid=kv, sketch=sk)
            alone, alone_state = sketchwalk_attention(q[:1], k[:1], v[:1], cfg, layer, alone_state)
            torch.testing.assert_close(out[:1], alone, atol=floor_tol(alone), rtol=0, msg=f"long row, layer {layer}")
            rows = slice(n - short, n)
            solo, _ = sketchwalk_attention(q[1:, :, rows], k[1:, :, rows], v[1:, :, rows], cfg, layer)
            torch.testing.assert_close(out[1:, :, rows], solo, atol=floor_tol(solo), rtol=0,
                                       msg=f"short row, layer {layer}")
            ref = dense_attention(q[1:, :, rows], k[1:, :, rows], v[1:, :, rows])
            torch.testing.assert_close(out[1:, :, rows], ref, atol=floor_tol(ref), rtol=0,
                                       msg=f"short row vs dense, layer {layer}")
    c = flexwalk.counters()
    assert c["dense_short_rows"] == 3 and c["sparse_prefill"] == 6 and c["dense_short"] == 3
    assert c.get("triton_prefill", 0) == (0 if kernel == "flex" else 6)
    # the batch keeps its sketch (torch selection) or not; the long row alone never does
    assert c.get("triton_selection", 0) == (0 if kernel != "triton+selection" else 3 if keep_sketch else 6)
