"""One decode step of one sparse layer (`sketchwalk_decode`): absorb the new token into the
layer's state, score it against the sketched (or bounded) block keys, walk (the row handed over
from the previous sparse layer of the same step), keep sink + current block + pinned + top-k
blocks, and attend over them with the split-KV Triton kernel or a one-row flex BlockMask.

The state update and the selection are one tensor function (`step_core`), compiled on CUDA;
with a fixed-size cache on CUDA the whole step is captured in a CUDA graph after its first run
and replayed.  Nothing here syncs with the host.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import stats
from ..distributed import group_any, group_mean
from ..options import Options, current_options
from ..kernels import triton_decode
from ..kernels.flex import bucket_length, decode_block_mask, flex
from ..selection.sketch import block_causal_mask, head_reduce, transition_rows
from ..selection.topk import rank_blocks
from ..selection.walk import walk_combine
from .scoring import bound_rows
from .state import INT, DecodeState, absorb_bounds, absorb_tokens


def check_walk_row(walk_row: torch.Tensor | None, batch: int, capacity: int) -> None:
    if walk_row is not None and walk_row.shape != (batch, capacity):
        raise ValueError(
            f"walk_row has shape {tuple(walk_row.shape)}, this layer's state needs {(batch, capacity)}: "
            "pass the row returned by the previous sparse layer of the same step"
        )


def short_decode_rows(k_count: torch.Tensor, p_tok: torch.Tensor, dense_below: int) -> torch.Tensor | None:
    """[B] bool: where the batch holds at least dense_below tokens (p_tok + 1), the rows with
    fewer real ones (k_count summed, the new token included): they attend every causal block, as
    they would decode alone (selection.topk.short_rows' rule for one row).  None for dense_below 0."""
    if dense_below <= 0:
        return None
    return (k_count.sum(-1) < dense_below) & (p_tok + 1 >= dense_below)


def _select_core(k_sketch, k_count, trans, p, qm, walk_row, p_tok, dense, pinned, *, bs, scale, exponent, walk_mode,
                 damping, walk_steps, sink_blocks, local_blocks, top_k, density, dense_below=0, q=None, k_bounds=None,
                 softcap=None, w=None):
    """Tensor core of the decode selection (compiled on CUDA together with the state update).
    k_bounds given (decode_scoring="bound"): the token's row is `bound_rows` of q [B, Hq, 1, D];
    w [B, 1, C]: the token's row computed already (tensor parallelism: reduced over the group).
    dense: 0-dim or [B] bool, rows attending every causal block; so do `short_decode_rows`."""
    c = k_count.shape[1]
    idx = torch.arange(c, device=k_count.device)
    bt = (p_tok // bs).reshape(1)
    block_valid = k_count > 0
    allowed = block_causal_mask(block_valid, bt)  # [B, 1, C]
    if w is None:  # [B, 1, C]
        w = (transition_rows(qm @ p, k_sketch, allowed, scale, exponent) if k_bounds is None
             else bound_rows(q, k_bounds, allowed, scale, softcap))
    prev = None if walk_row is None else walk_row[:, None, :]
    row = walk_combine(w, prev, trans, walk_mode, damping, walk_steps)
    kept, order, n_causal = rank_blocks(row, allowed, block_valid, bt, sink_blocks=sink_blocks,
                                        local_blocks=local_blocks, top_k=top_k, density=density, pinned=pinned)
    row, kept, order, n_causal = row[:, 0], kept[:, 0], order[:, 0].to(INT), n_causal[:, 0]
    short = short_decode_rows(k_count, p_tok, dense_below)
    if short is not None:
        dense = short if dense is None else dense | short
    if dense is not None:
        dense = dense.reshape(-1)
        kept = torch.where(dense, (bt + 1).to(kept.dtype).expand_as(kept), kept)
        order = torch.where(dense[:, None], idx.to(INT)[None, :].expand_as(order), order)
    return row, kept.to(INT), order, kept.float(), n_causal.float()


def _consts(state: "DecodeState") -> dict:
    cfg = state.config
    return dict(
        bs=state.block_size, scale=state.scale, exponent=float(cfg.sparsity_exponent), walk_mode=cfg.walk,
        damping=float(cfg.damping), walk_steps=cfg.walk_steps, sink_blocks=cfg.sink_blocks, local_blocks=cfg.local_blocks,
        top_k=cfg.top_k_blocks, density=cfg.density, dense_below=cfg.min_sparse_length(state.device),
    )


def decode_select(
    state: DecodeState,
    q_t: torch.Tensor,
    walk_row: torch.Tensor | None,
    *,
    dense: torch.Tensor | bool = False,
    position: torch.Tensor | None = None,
    softcap: float | None = None,
):
    """Selection for the token just absorbed (q_t [B, Hq, 1, D]).

    Returns (walk row [B, C], kv_num_blocks [B] int32, kv_indices [B, C] int32, kept [B],
    causal [B]).  dense: a bool (or 0-dim bool tensor) forcing every causal block (exact
    dense decode through the same kernel).  position: the token's position when it may
    differ from the state's (a static cache): blocks up to it are allowed.  softcap: the
    model's logit softcap (decode_scoring="bound" caps its bounds the same way).
    """
    check_walk_row(walk_row, state.batch, state.capacity)
    p_tok = state.pos - 1 if position is None else position.reshape(()).to(torch.int64)
    dense_t = None if isinstance(dense, bool) and not dense else torch.as_tensor(dense, device=state.device)
    return _select_core(
        state.k_sketch, state.k_count, state.transition, state.sketch, head_reduce(q_t, state.config.head_scoring), walk_row,
        p_tok, dense_t, state.pinned, q=q_t, k_bounds=state.k_bounds, softcap=softcap, **_consts(state),
    )


def _cache_mismatch(k_rows, last_key, position, pos):
    """0-d bool: the cache's key at pos - 1 is not the one the state absorbed, or the step's
    position is not the state's."""
    bad = ~torch.eq(k_rows[:, :, 0], last_key).all()
    return bad if position is None else bad | (position != pos)


def _step_core(k_sum, k_count, k_sketch, trans, q_sum, q_count, pos, last_key, stale, stale_steps, all_stale_steps,
               short_rows, q, k_rows, valid, walk_row, position, p, pinned, k_bounds, *, force_dense, head_scoring,
               softcap, reduced=None, **consts):
    """One decode step's state update and selection, tensors only (no host sync).

    k_rows: [B, Hkv, 2, D], the cache's keys at positions pos - 1 and pos (the last absorbed
    token and the new one).  Checks the cache against the state (key fingerprint, position),
    absorbs the new token in place and selects its blocks.  Returns the values that replace the state's small
    tensors and the selection.  reduced: (query head mean, key head mean, mismatch flag, the
    token's bound row or None) already reduced over a tensor-parallel group (then used instead
    of this rank's own; the bounds are then updated already).
    """
    k_new = k_rows[:, :, 1:]  # the cache's key at pos
    if reduced is None:
        bad = _cache_mismatch(k_rows, last_key, position, pos)
        qm, km = head_reduce(q, head_scoring), head_reduce(k_new, head_scoring)
        w_red, bounds = None, (k_bounds, k_new)
    else:  # the bounds were absorbed already, with the rank's share of the row (_tp_bound_row)
        qm, km, bad, w_red = reduced
        bounds = (None, None)
    stale = stale | bad
    stale_steps += stale.to(stale_steps.dtype)
    all_stale_steps += stale.to(stale_steps.dtype)
    bsz = q.shape[0]
    valid_f = torch.ones(bsz, 1, device=q.device) if valid is None else valid.to(torch.float32)
    q_sum, q_count = absorb_tokens(k_sum, k_count, k_sketch, trans, q_sum, q_count, pos, qm, km, valid_f, p,
                             consts["bs"], consts["scale"], consts["exponent"], *bounds)
    new_pos = pos + 1
    p_tok = new_pos - 1 if position is None else position
    short = short_decode_rows(k_count, p_tok, consts["dense_below"])
    if short is not None:  # counted here; _select_core makes them dense
        short_rows += short.sum().to(short_rows.dtype)
    dense = stale | force_dense if not force_dense else torch.ones_like(stale)
    row, kv_num, kv_idx, kept, causal = _select_core(k_sketch, k_count, trans, p, qm, walk_row, p_tok, dense, pinned,
                                                     q=q, k_bounds=k_bounds, softcap=softcap,
                                                     w=w_red, **consts)
    return (q_sum.contiguous(), q_count.contiguous(), new_pos, k_new[:, :, 0].contiguous(), stale, row, kv_num,
            kv_idx, kept, causal, (p_tok + 1).to(INT))


_compiled_step_core = torch.compile(_step_core, dynamic=False)


def decode_kernel(q: torch.Tensor, block_size: int, options: Options | None = None) -> str:
    """The kernel a decode step with this query runs: "triton" or "flex".  Options.decode_kernel
    "auto" runs the split-KV Triton kernel (kernels.triton_decode) on CUDA where it supports the
    shapes and compiled flex with a one-row BlockMask elsewhere; "flex" and "triton" force one
    (tests run "triton" on CPU through triton's interpreter)."""
    kernel = (current_options() if options is None else options).decode_kernel
    if kernel == "auto":
        return "triton" if q.device.type == "cuda" and triton_decode.supported(q, block_size) else "flex"
    return kernel


def _step_fn(compiled: bool):
    """The step core, compiled (~40 small kernels fused into a few: on CUDA, where launches
    dominate) or eager (on CPU, where the ops are cheap and compiling each shape costs seconds)."""
    return _compiled_step_core if compiled else _step_core


def _tp_bound_row(state: DecodeState, q, k_new, valid, position, softcap) -> torch.Tensor:
    """Tensor parallelism, decode_scoring="bound": absorb the new key [B, Hkv, 1, D] into this
    rank's bounds and return its share of the token's row, [B, 1, C] (to be averaged over the
    group; the step core then skips the bounds).  The allowed blocks are the ones the step core
    will allow: real blocks up to the token's, the token's own block counted if it is real."""
    bs = state.block_size
    vf = torch.ones(q.shape[0], 1, device=q.device) if valid is None else valid.to(torch.float32)
    blk = state.pos // bs
    absorb_bounds(state.k_bounds, k_new, blk.reshape(1), vf)
    idx = torch.arange(state.capacity, device=q.device)
    block_valid = (state.k_count > 0) | ((idx == blk)[None, :] & (vf > 0))
    p_tok = state.pos if position is None else position
    allowed = block_causal_mask(block_valid, (p_tok // bs).reshape(1))
    return bound_rows(q, state.k_bounds, allowed, state.scale, softcap)


def _step_inplace(state: DecodeState, q, k, v, walk_row, valid, pos_t, *, scale, softcap, force_dense, kernel,
                  compiled):
    """One step writing the new state into the state's own tensors (fixed addresses, so a CUDA
    graph can replay it).  Returns (out [B, Hq, 1, D], walk row, kept, causal)."""
    bsz, hq, _, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    k_rows = k.index_select(2, state.pos - state.prev_and_new)
    reduced = None
    if state.process_group is not None:  # tensor parallelism: the group's head means, one staleness verdict
        group, head_scoring = state.process_group, state.config.head_scoring
        qm = group_mean(head_reduce(q, head_scoring), group)
        km = group_mean(head_reduce(k_rows[:, :, 1:], head_scoring), group)
        bad = group_any(_cache_mismatch(k_rows, state.last_key, pos_t, state.pos), group)
        w_red = None
        if state.k_bounds is not None:  # each rank bounds its own heads: the row's head mean spans the group
            w_red = group_mean(_tp_bound_row(state, q, k_rows[:, :, 1:], valid, pos_t, softcap), group)
        reduced = (qm, km, bad, w_red)
    (q_sum, q_count, pos, last_key, stale, row, kv_num, kv_idx, kept, causal, end) = _step_fn(compiled)(
        state.k_sum, state.k_count, state.k_sketch, state.transition, state.q_sum, state.q_count, state.pos,
        state.last_key, state.stale, state.stale_steps, stats.device_counter(stats.DECODE_STALE_STEPS, q.device),
        stats.device_counter(stats.DENSE_DECODE_SHORT_ROWS, q.device), q, k_rows, valid, walk_row, pos_t, state.sketch, state.pinned, state.k_bounds,
        force_dense=force_dense, head_scoring=state.config.head_scoring, softcap=softcap, reduced=reduced,
        **_consts(state),
    )
    for dst, src in ((state.q_sum, q_sum), (state.q_count, q_count), (state.pos, pos), (state.last_key, last_key),
                     (state.stale, stale)):
        dst.copy_(src)
    if kernel == "triton":
        # the kernel reads only the selected blocks of the cache as it is: no padding, no BlockMask
        out = triton_decode.sparse_decode_attention(q, k, v, kv_num, kv_idx, state.key_start, end,
                                                    block_size=state.block_size, scale=scale, softcap=softcap)
    else:
        if s < state.kv_tokens:  # growing cache: pad to the capacity so shapes stay fixed
            k = F.pad(k, (0, 0, 0, state.kv_tokens - s))
            v = F.pad(v, (0, 0, 0, state.kv_tokens - s))
        g = hq // hkv
        bm = decode_block_mask(kv_num, kv_idx, state.key_start, end, rows=g, kv_tokens=state.kv_tokens,
                               block_size=state.block_size, zeros=state.zero_blocks(kv_idx))
        qv = q.reshape(bsz, hkv, g, d)  # the G query heads of each KV head as G query rows
        out = flex(qv, k, v, bm, scale=scale, softcap=softcap, block_size=state.block_size, decode=True)
        out = out.reshape(bsz, hq, 1, d)
    return out, row, kept, causal


def graphable(state: DecodeState, q: torch.Tensor, kw: dict, opts: Options) -> bool:
    """Whether to capture this step (Options.decode_graphs): with a fixed-size (static) cache on
    CUDA and the Triton kernel, a state captures its whole step (state update, selection,
    attention) after its first step and replays it for every later one: one graph launch plus
    four small input copies instead of ~20 kernel launches and the Python around them."""
    return (opts.decode_graphs and q.device.type == "cuda" and not state.growable and kw["kernel"] == "triton"
            and state.last_key is not None and state.process_group is None
            and not torch.cuda.is_current_stream_capturing())


def graph_key(k, v, walk_row, valid, pos_t, kw) -> tuple:
    """What a captured step is specialised to: the cache tensors themselves, which optional
    inputs are present (and their shapes), and the step's options."""
    shape = lambda t: None if t is None else (tuple(t.shape), t.dtype)  # noqa: E731
    return (k.data_ptr(), v.data_ptr(), shape(k), shape(v), shape(walk_row), shape(valid), shape(pos_t),
            tuple(sorted(kw.items())))


class _StepGraph:
    """One layer's decode step captured in a CUDA graph, replayed with fresh inputs."""

    def __init__(self, state: DecodeState, q, k, v, walk_row, valid, pos_t, kw):
        self.key = graph_key(k, v, walk_row, valid, pos_t, kw)
        clone = lambda t: None if t is None else t.clone()  # noqa: E731
        self.q, self.walk_row, self.valid, self.pos = clone(q), clone(walk_row), clone(valid), clone(pos_t)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = _step_inplace(state, self.q, k, v, self.walk_row, self.valid, self.pos, **kw)

    def fits(self, k, v, walk_row, valid, pos_t, kw) -> bool:
        return graph_key(k, v, walk_row, valid, pos_t, kw) == self.key

    def replay(self, q, walk_row, valid, pos_t):
        for dst, src in ((self.q, q), (self.walk_row, walk_row), (self.valid, valid), (self.pos, pos_t)):
            if dst is not None:
                dst.copy_(src)
        self.graph.replay()
        return self.outputs


def sketchwalk_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: DecodeState,
    walk_row: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    valid: torch.Tensor | None = None,
    position: torch.Tensor | None = None,
    dense: bool = False,
    options: Options | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decode step of one sparse layer.  Returns (out [B, Hq, 1, D], walk row [B, C]).

    q: [B, Hq, 1, D]; k, v: [B, Hkv, S, D], the cache with the new token already written at
    index state.length (S = state.length + 1 for a growing cache, or the static cache size).
    walk_row: the row returned by the previous sparse layer of this step (None for the first).
    valid: [B, 1] bool validity of the new token.  position: 0-dim tensor with the new token's
    cache position when it is only known on the device (static caches).  If it differs from
    the state's, or the cache's key at the last absorbed position is not the one the state
    absorbed (another sequence's cache), the state is stale: this and every later step attend
    densely (exact), `state.stale_steps` and flexwalk.counters()["decode_stale_steps"] count
    them.  All of this stays on the device.
    dense: attend every causal block (still updates the state and the walk row); so do the first
    config.decode_dense_steps steps after the prefill.
    On CUDA with a fixed-size cache the step is captured in a CUDA graph after its first run
    and replayed (Options.decode_graphs; counted in flexwalk.counters()["decode_graph_steps"]).
    options: the Options of this call (None: `flexwalk.current_options()`).
    """
    opts = current_options() if options is None else options
    bsz, _, L, _ = q.shape
    s = k.shape[2]
    if L != 1:
        raise ValueError(f"sketchwalk_decode takes one new token per row; q has {L} (use absorb + dense attention)")
    if s > state.kv_tokens:
        state.grow(bucket_length(s))
    if s < state.length + 1:
        raise ValueError(
            f"k has {s} positions but the state has absorbed {state.length} tokens: the new token must be in the cache"
        )
    check_walk_row(walk_row, bsz, state.capacity)
    pos_t = None if position is None else position.reshape(()).to(torch.int64)
    first = state.length - state.prompt_length < state.config.decode_dense_steps  # host ints: no sync
    if first:
        stats.count(stats.DENSE_DECODE_FIRST)
    kw = dict(scale=scale, softcap=softcap, force_dense=bool(dense) or first, kernel=decode_kernel(q, state.block_size, opts),
              compiled=opts.compile_decode == "always" or (opts.compile_decode == "cuda" and q.device.type == "cuda"))
    graph = state.captured_step
    if graph is not None and graph.fits(k, v, walk_row, valid, pos_t, kw):
        out, row, kept, causal = graph.replay(q, walk_row, valid, pos_t)
        stats.count(stats.DECODE_GRAPH_STEPS)
    else:
        out, row, kept, causal = _step_inplace(state, q, k, v, walk_row, valid, pos_t, **kw)
        if graphable(state, q, kw, opts):  # warm now: capture this step for the next ones (records, runs nothing)
            state.captured_step = _StepGraph(state, q, k, v, walk_row, valid, pos_t, kw)
    if kw["kernel"] == "triton":
        stats.count(stats.TRITON_DECODE)
    state.length += 1
    stats.record_density(state.layer_idx, kept, causal, phase="decode")
    return out, row
