"""The prefill selection in five Triton kernels and two cuBLAS products, no inductor.

The selection (selection.select + block_mask.selection_tables + walk.table_to_indices) written
with torch ops is about 140 small kernels; inside the CUDA graph that replays it they still take
~0.4 ms of GPU time at 8K (H100), more than a third of the whole sparse layer.  inductor fuses
them into about a dozen, but compiles each length bucket for 7-72 s first.  These kernels do
the same work in seven launches (plus the two density sums; the budget lookup table is built
once per configuration and block count), compiled by Triton once per configuration and
power-of-two block count (under a second, cached on disk):

  _bounds_kernel    each row's real keys [start, end) from the validity (block_mask.key_bounds)
  _sketch_kernel    block means of the head-mean q and k over valid tokens, times the SRHT
                    matrix (sketch.block_means, then `@ p`), and the valid tokens per block
  torch.bmm         block scores A = Qs Ks^T
  _softmax_kernel   W = softmax(s * scale * A) over the allowed (causal, valid) blocks
                    (selection.transition_rows, sketch.block_causal_mask)
  torch.bmm         R_{l-1} W (the walk; skipped for one_hop and the first sparse layer)
  _rank_kernel      per kernel query block: the walk rows (walk.walk_combine), pooled over its
                    block_size sub-rows, the budget with sink, local and dense-tail blocks
                    (walk.rank_blocks), the top `kept` blocks (a bisection on the scores'
                    ordered bit patterns: ties go to the lower index, as a stable sort), the
                    partial/full split against causality and padding (structural_tables) and
                    the BlockMask's index lists (table_to_indices)

Outputs are those of attention._selection_tables, with the same meaning; the float sums run
in another order, so the walk matches to float32 rounding and a block whose score ties the
row's threshold to rounding may be swapped for its equal (tests/test_triton_selection.py).

With head_scoring="per_head" the block means, sketches and per-head scores are torch ops on the
layer's q and k (as selection.layer_sketch computes them), and the softmax kernel averages the
heads' softmax rows; the rest is the same.

`selection_tables` runs on CUDA tensors, or on CPU tensors under triton's interpreter (tests).
Rows of more than MAX_BLOCKS blocks (beyond 256K tokens with 64-token blocks) are not
handled: `supported` says so and the caller keeps the torch selection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import SketchWalkConfig
from .sketch import block_means
from .triton_decode import HAS_TRITON, interpreted
from .walk import fraction_count, walk_combine

if HAS_TRITON:
    import triton
    import triton.language as tl

# A row of the walk is held in registers by one program: 4096 fp32 entries over 8 warps.
MAX_BLOCKS = 4096
if HAS_TRITON:  # Triton kernels read module globals only as constexpr
    _INT_MIN = tl.constexpr(-2147483648)
    _INF_BITS = tl.constexpr(0x7F800000)  # the bit pattern of +inf, above every finite float's

if HAS_TRITON:

    @triton.jit
    def _bounds_kernel(VALID, START, END, svb, S, CHUNK: tl.constexpr):
        """Program b: start = first valid position, end = last + 1 (both S without any)."""
        b = tl.program_id(0)
        lo = tl.full([CHUNK], S, tl.int32)
        hi = tl.zeros([CHUNK], tl.int32)
        for c0 in range(0, S, CHUNK):
            pos = c0 + tl.arange(0, CHUNK)
            v = tl.load(VALID + b * svb + pos, mask=pos < S, other=0) != 0
            lo = tl.minimum(lo, tl.where(v, pos, S))
            hi = tl.maximum(hi, tl.where(v, pos + 1, 0))
        start = tl.min(lo, 0)
        end = tl.max(hi, 0)
        tl.store(START + b, start)
        tl.store(END + b, tl.where(start < S, end, S))

    @triton.jit(do_not_specialize=["N"])
    def _sketch_kernel(QM, KM, VALID, P, QS, KS, COUNTS,
                       sqb, sqn, skb, skn, svb, N, NB, D, R,
                       BS: tl.constexpr, TC: tl.constexpr, D_POW2: tl.constexpr, R_POW2: tl.constexpr,
                       RC: tl.constexpr, HAS_VALID: tl.constexpr):
        """Program (b, i): means of block i's valid tokens of q and k ([n, D] head means, fp32),
        projected on the SRHT matrix P [D, R]; the block's valid token count."""
        b = tl.program_id(0)
        i = tl.program_id(1)
        d = tl.arange(0, D_POW2)
        dm = d < D
        acc_q = tl.zeros([D_POW2], tl.float32)
        acc_k = tl.zeros([D_POW2], tl.float32)
        cnt = tl.zeros([TC], tl.float32)
        for t0 in tl.static_range(0, BS, TC):
            tok = i * BS + t0 + tl.arange(0, TC)
            inb = tok < N
            if HAS_VALID:
                v = tl.where(tl.load(VALID + b * svb + tok, mask=inb, other=0) != 0, 1.0, 0.0)
            else:
                v = tl.where(inb, 1.0, 0.0)
            m2 = inb[:, None] & dm[None, :]
            xq = tl.load(QM + b * sqb + tok[:, None] * sqn + d[None, :], mask=m2, other=0.0)
            xk = tl.load(KM + b * skb + tok[:, None] * skn + d[None, :], mask=m2, other=0.0)
            acc_q += tl.sum(xq * v[:, None], 0)
            acc_k += tl.sum(xk * v[:, None], 0)
            cnt += v
        c = tl.sum(cnt, 0)
        mean_q = acc_q / tl.maximum(c, 1.0)
        mean_k = acc_k / tl.maximum(c, 1.0)
        for r0 in tl.static_range(0, R_POW2, RC):
            r = r0 + tl.arange(0, RC)
            rm = r < R
            p = tl.load(P + d[:, None] * R + r[None, :], mask=dm[:, None] & rm[None, :], other=0.0)
            tl.store(QS + (b * NB + i) * R + r, tl.sum(mean_q[:, None] * p, 0), mask=rm)
            tl.store(KS + (b * NB + i) * R + r, tl.sum(mean_k[:, None] * p, 0), mask=rm)
        tl.store(COUNTS + b * NB + i, c)

    @triton.jit
    def _allowed_row(COUNTS, b, i, NB, NB_POW2: tl.constexpr):
        """Block i's allowed key blocks (sketch.block_causal_mask) and the valid blocks."""
        j = tl.arange(0, NB_POW2)
        inr = j < NB
        bv = (tl.load(COUNTS + b * NB + j, mask=inr, other=0.0) > 0) & inr
        allowed = (j <= i) & bv
        empty = tl.sum(allowed.to(tl.int32), 0) == 0
        return allowed | (empty & (j == i)), bv

    @triton.jit
    def _softmax_kernel(A, COUNTS, W, NB, scale, exponent, H: tl.constexpr, NB_POW2: tl.constexpr):
        """Program (b, i): row i of W = softmax(exponent * scale * A) over its allowed blocks; with
        H > 1 (per-head scoring, A [B, H, NB, NB]) the mean of the H heads' softmax rows."""
        b = tl.program_id(0)
        i = tl.program_id(1)
        j = tl.arange(0, NB_POW2)
        inr = j < NB
        allowed, _ = _allowed_row(COUNTS, b, i, NB, NB_POW2)
        out = (b * NB + i).to(tl.int64) * NB
        if H == 1:
            a = tl.load(A + out + j, mask=inr, other=0.0)
            x = tl.where(allowed, (a * scale) * exponent, float("-inf"))
            e = tl.exp(x - tl.max(x, 0))
            tl.store(W + out + j, e / tl.sum(e, 0), mask=inr)
        else:
            acc = tl.zeros([NB_POW2], tl.float32)
            for h in range(H):
                row = ((b * H + h) * NB + i).to(tl.int64) * NB
                a = tl.load(A + row + j, mask=inr, other=0.0)
                x = tl.where(allowed, (a * scale) * exponent, float("-inf"))
                e = tl.exp(x - tl.max(x, 0))
                acc += e / tl.sum(e, 0)
            tl.store(W + out + j, acc / H, mask=inr)

    @triton.jit(do_not_specialize=["n_int"])
    def _rank_kernel(W, PW, R_OUT, COUNTS, BUDGET, START, END, N_PTR,
                     P_CNT, P_IDX, F_CNT, F_IDX, TABLE, KEPT, CAUSAL,
                     NB, NQ, damping, n_int,
                     M: tl.constexpr, BS: tl.constexpr, NB_POW2: tl.constexpr, MODE: tl.constexpr,
                     SINK: tl.constexpr, LOCAL: tl.constexpr, TAIL: tl.constexpr, N_FROM_PTR: tl.constexpr):
        """Program (b, I): kernel query block I (walk rows I*M .. I*M+M-1).  MODE 0: R = W;
        1: R = normalise(PW); 2: R = (1 - damping) W + damping normalise(PW)."""
        b = tl.program_id(0)
        qi = tl.program_id(1)
        j = tl.arange(0, NB_POW2)
        inr = j < NB
        if N_FROM_PTR:
            n = tl.load(N_PTR).to(tl.int32)
        else:
            n = n_int
        last_row = (n + BS - 1) // BS  # walk rows past the real ones select nothing
        pooled = tl.zeros([NB_POW2], tl.float32)
        allowed = j < 0
        for t in tl.static_range(M):
            i = qi * M + t
            row = (b * NB + i).to(tl.int64) * NB
            w = tl.load(W + row + j, mask=inr, other=0.0)
            if MODE == 0:
                r = w
            else:
                pw = tl.load(PW + row + j, mask=inr, other=0.0)
                walked = pw / tl.maximum(tl.sum(pw, 0), 1.1754943508222875e-38)
                if MODE == 1:
                    r = walked
                else:
                    r = (1.0 - damping) * w + damping * walked
            tl.store(R_OUT + row + j, r, mask=inr)
            allowed_i, bv = _allowed_row(COUNTS, b, i, NB, NB_POW2)
            allowed = allowed | (allowed_i & (i < last_row))
            pooled += r
        if M > 1:
            pooled = pooled / M
        # walk.rank_blocks for this row
        causal_valid = allowed & bv
        valid_rank = tl.cumsum(bv.to(tl.int32), 0) - 1
        q_blk = qi * M + (M - 1)
        forced = causal_valid & ((valid_rank < SINK) | (j > q_blk - LOCAL))
        n_causal = tl.sum(causal_valid.to(tl.int32), 0)
        n_forced = tl.sum(forced.to(tl.int32), 0)
        kept = tl.minimum(n_causal, tl.maximum(n_forced, tl.load(BUDGET + n_causal)))
        if TAIL > 0:
            last_q = (n + BS * M - 1) // (BS * M)
            kept = tl.where(qi >= last_q - TAIL, n_causal, kept)
        kept = tl.where(n_causal == 0, 1, kept)
        # scores as ints ordered like the floats; forced above all, not allowed below all
        score = tl.where(pooled == 0.0, 0.0, pooled)  # -0.0 ties +0.0, as in a sort
        bits = score.to(tl.int32, bitcast=True)
        key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
        key = tl.where(forced, _INF_BITS, key)
        key = tl.where(allowed, key, _INT_MIN + 1)
        key = tl.where(inr, key, _INT_MIN)
        # the kept-th largest key: the largest t with #(key >= t) >= kept
        lo = tl.full([], _INT_MIN, tl.int64)
        hi = tl.full([], 2147483648, tl.int64)
        for _ in range(32):
            mid = (lo + hi) >> 1
            ok = tl.sum((key >= mid.to(tl.int32)).to(tl.int32), 0) >= kept
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid)
        t = lo.to(tl.int32)
        above = key > t
        tie = key == t
        take = kept - tl.sum(above.to(tl.int32), 0)
        sel = (above | (tie & (tl.cumsum(tie.to(tl.int32), 0) <= take))) & allowed
        rq = b * NQ + qi
        tl.store(TABLE + rq.to(tl.int64) * NB + j, sel.to(tl.int8), mask=inr)
        tl.store(KEPT + rq, tl.sum((sel & bv).to(tl.int32), 0))
        tl.store(CAUSAL + rq, n_causal)
        # partial / full against causality and each row's real keys (block_mask.structural_tables)
        start = tl.load(START + b)
        end = tl.load(END + b)
        q_lo = qi * (BS * M)
        q_hi = tl.minimum(q_lo + BS * M, n) - 1
        k_lo = j * BS
        k_hi = tl.minimum(k_lo + BS, n) - 1
        real = (q_lo < n) & (k_lo < n)
        n_valid = tl.maximum(tl.minimum(k_hi + 1, end) - tl.maximum(k_lo, start), 0)
        holds_self = (k_lo <= q_hi) & (k_hi >= q_lo)
        maybe = real & (k_lo <= q_hi) & ((n_valid > 0) | holds_self)
        full_s = real & (k_hi <= q_lo) & (k_hi - k_lo + 1 == BS) & (n_valid == BS)
        chosen = sel & maybe
        _index_list(chosen & full_s, inr, F_CNT, F_IDX, rq, NB, j)
        _index_list(chosen & ~full_s, inr, P_CNT, P_IDX, rq, NB, j)

    @triton.jit
    def _index_list(flag, inr, CNT, IDX, rq, NB, j):
        """The row's flagged block ids ascending, then the others ascending (a stable argsort of
        ~flag, as walk.table_to_indices)."""
        f = flag.to(tl.int32)
        cnt = tl.sum(f, 0)
        rest = (~flag & inr).to(tl.int32)
        pos = tl.where(flag, tl.cumsum(f, 0) - 1, cnt + tl.cumsum(rest, 0) - 1)
        tl.store(CNT + rq, cnt)
        tl.store(IDX + rq.to(tl.int64) * NB + pos, j, mask=inr)


def supported(config: SketchWalkConfig, n_pad: int, device: torch.device) -> bool:
    """Whether `selection_tables` handles this selection: triton on CUDA (or its interpreter),
    a sketched walk (not the oracle), at most MAX_BLOCKS blocks per row and whole kernel query
    blocks."""
    nb = n_pad // config.block_size
    on = torch.device(device).type == "cuda" or interpreted()
    return HAS_TRITON and on and config.walk != "oracle" and nb <= MAX_BLOCKS and n_pad % config.q_block == 0


def _pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


_BUDGETS: dict[tuple, torch.Tensor] = {}


def budget_table(config: SketchWalkConfig, nb: int, device: torch.device) -> torch.Tensor:
    """[nb + 1] int32: the budget of a row with c causal blocks (walk.rank_blocks' rule, in float64).

    A constant, cached per (configuration, blocks, device).  Never stored during a CUDA-graph
    capture: captured kernels do not run then, so a table built there holds garbage until the
    graph replays.  flexwalk's own selection graph builds it in the warm-up run before its
    capture, which then reads the cached table."""
    key = (config, nb, device)
    table = _BUDGETS.get(key)
    if table is None:
        c = torch.arange(nb + 1, device=device, dtype=torch.int32)
        if config.top_k_blocks is not None:
            table = torch.full_like(c, config.top_k_blocks)
        else:
            table = fraction_count(c, config.density)
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            _BUDGETS[key] = table
    return table


def selection_tables(qm: torch.Tensor, km: torch.Tensor, p: torch.Tensor, prev_walk: torch.Tensor | None,
                     key_valid: torch.Tensor | None, config: SketchWalkConfig, scale: float | None, n_pad: int,
                     seq_len: int | torch.Tensor | None = None):
    """attention._selection_tables in Triton.

    qm, km: [B, Hq, n, D], [B, Hkv, n, D] over n <= n_pad tokens, any float dtype.  Head-mean
    scoring reduces them to their fp32 head means first (selection.head_reduce, without its fp32
    copy); the CUDA graph passes its own head means (H = 1, n = n_pad, zero past the real
    length).  With head_scoring="per_head" each head's block means and scores are torch ops,
    then the same kernels.  p: [D, r] SRHT matrix; prev_walk: [B, nb, nb]
    fp32 R_{l-1} over nb = n_pad / block_size blocks, or None; key_valid: [B, n] bool or None;
    seq_len: real tokens (a 0-d tensor inside a graph, default n).  Returns (partial counts,
    partial indices, full counts, full indices, selection table, start, end, walk, kept, causal)
    over n_pad tokens: counts [B, nq] int32, indices [B, nq, nb] int32, table [B, nq, nb] bool,
    start / end [B] int32, walk [B, nb, nb] fp32, kept / causal [B] fp32.  No host sync.
    """
    per_head = config.head_scoring == "per_head"
    bsz, hq, n, d = qm.shape
    hk = km.shape[1]
    if not per_head:  # [B, n, D] fp32 head means
        qm = qm[:, 0].float() if hq == 1 else torch.mean(qm, 1, dtype=torch.float32)
        km = km[:, 0].float() if hk == 1 else torch.mean(km, 1, dtype=torch.float32)
    bs, qb = config.block_size, config.q_block
    m = qb // bs
    nb, nq = n_pad // bs, n_pad // qb
    if n_pad % qb or n > n_pad:
        raise ValueError(f"n_pad={n_pad} must be a multiple of the query block ({qb}) and >= the {n} tokens given")
    if nb > MAX_BLOCKS:
        raise ValueError(f"n_pad={n_pad} gives {nb} blocks of {bs} tokens; the Triton selection handles <= {MAX_BLOCKS}")
    dev = qm.device
    r = p.shape[1]
    scale = d**-0.5 if scale is None else float(scale)
    f32 = dict(device=dev, dtype=torch.float32)
    i32 = dict(device=dev, dtype=torch.int32)
    p = p.float().contiguous()
    valid = None if key_valid is None else key_valid.contiguous().view(torch.uint8)
    if seq_len is None:
        seq_len = n

    # each row's real keys
    if valid is None:
        start = torch.zeros(bsz, **i32)
        end = (torch.full((bsz,), seq_len, **i32) if not isinstance(seq_len, torch.Tensor)
               else seq_len.to(torch.int32).expand(bsz).contiguous())
    else:
        start, end = torch.empty(bsz, **i32), torch.empty(bsz, **i32)
        _bounds_kernel[(bsz,)](valid, start, end, valid.stride(0), valid.shape[1], CHUNK=1024)

    # block means, sketches and block scores
    if per_head:  # each head's own (selection.layer_sketch): [B, H, nb, r], scores [B, Hq, nb, nb]
        q_means, counts = block_means(qm, bs, key_valid)
        k_means, _ = block_means(km, bs, key_valid)
        grow = nb - q_means.shape[2]  # blocks of the bucket past the real ones: empty
        qs = F.pad(q_means, (0, 0, 0, grow)) @ p
        ks = F.pad(k_means, (0, 0, 0, grow)) @ p
        counts = F.pad(counts.expand(bsz, -1), (0, grow)).contiguous()
        a = torch.matmul(qs.reshape(bsz, hk, (hq // hk) * nb, r), ks.transpose(-1, -2)).reshape(bsz, hq, nb, nb)
        heads = hq
    else:
        qm = qm if qm.stride(-1) == 1 else qm.contiguous()
        km = km if km.stride(-1) == 1 else km.contiguous()
        qs, ks = torch.empty(bsz, nb, r, **f32), torch.empty(bsz, nb, r, **f32)
        counts = torch.empty(bsz, nb, **f32)
        d2, r2 = _pow2(d), _pow2(r)
        rc = min(r2, max(16, 8192 // d2))
        tc = min(bs, max(8, 4096 // d2))
        _sketch_kernel[(bsz, nb)](
            qm, km, valid if valid is not None else qm, p, qs, ks, counts,
            qm.stride(0), qm.stride(1), km.stride(0), km.stride(1), 0 if valid is None else valid.stride(0),
            n, nb, d, r, BS=bs, TC=tc, D_POW2=d2, R_POW2=r2, RC=rc, HAS_VALID=valid is not None,
        )
        a = torch.bmm(qs, ks.transpose(1, 2))
        heads = 1

    # W = softmax over the allowed blocks of the scaled scores (the heads' mean for per_head)
    nb2 = _pow2(nb)
    warps = 4 if nb2 <= 1024 else 8
    w = torch.empty(bsz, nb, nb, **f32)
    _softmax_kernel[(bsz, nb)](a, counts, w, nb, scale, float(config.sparsity_exponent), H=heads, NB_POW2=nb2,
                               num_warps=warps)

    # the walk, the budget, the top blocks and the BlockMask's lists
    mode = 0
    pw = w
    if prev_walk is not None and config.walk != "one_hop":
        mode = 1 if config.walk == "walk" else 2
        # walk_steps > 1: all but the last step here (walk.walk_combine), the last in _rank_kernel
        prev_walk = walk_combine(w, prev_walk, w, config.walk, float(config.damping), config.walk_steps - 1)
        pw = torch.bmm(prev_walk, w)
    walk = torch.empty(bsz, nb, nb, **f32)
    p_cnt, f_cnt = torch.empty(bsz, nq, **i32), torch.empty(bsz, nq, **i32)
    p_idx, f_idx = torch.empty(bsz, nq, nb, **i32), torch.empty(bsz, nq, nb, **i32)
    table = torch.empty(bsz, nq, nb, device=dev, dtype=torch.bool)
    kept, causal = torch.empty(bsz, nq, **i32), torch.empty(bsz, nq, **i32)
    n_ptr = seq_len if isinstance(seq_len, torch.Tensor) else start
    _rank_kernel[(bsz, nq)](
        w, pw, walk, counts, budget_table(config, nb, dev), start, end, n_ptr,
        p_cnt, p_idx, f_cnt, f_idx, table.view(torch.int8), kept, causal,
        nb, nq, float(config.damping), 0 if isinstance(seq_len, torch.Tensor) else int(seq_len),
        M=m, BS=bs, NB_POW2=nb2, MODE=mode, SINK=config.sink_blocks, LOCAL=config.local_blocks * m,
        TAIL=config.dense_tail_blocks, N_FROM_PTR=isinstance(seq_len, torch.Tensor), num_warps=warps,
    )
    return (p_cnt, p_idx, f_cnt, f_idx, table, start, end, walk,
            kept.sum(-1, dtype=torch.float32), causal.sum(-1, dtype=torch.float32))
