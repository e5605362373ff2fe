"""The prefill selection in five Triton kernels and two cuBLAS products, no inductor.

The selection (selection.driver.select + kernels.flex.selection_tables + selection.topk.table_to_indices) written
with torch ops is about 140 small kernels; inside the CUDA graph that replays it they still take
~0.4 ms of GPU time at 8K (H100), more than a third of the whole sparse layer.  inductor fuses
them into about a dozen, but compiles each length bucket for 7-72 s first.  These kernels do
the same work in seven launches (the budget lookup table is built once per configuration and
block count), compiled by Triton once per configuration and power-of-two block count (under a
second, cached on disk):

  _parts_kernel     the one pass over q and k (the selection's memory floor): per group of
                    PARTS_HEADS heads, each block's sum over its valid tokens, and the blocks'
                    valid counts (block_parts).  The CUDA graph's static inputs are these sums:
                    this launch, before each replay, writes them, the length, the validity and
                    the previous walk in place
  _bounds_kernel    each row's real keys [start, end) from the validity (kernels.flex.key_bounds);
                    only for a padded batch (without padding they are [0, n))
  _sketch_kernel    the groups' sums / (heads x count): block means of the head-mean q and k
                    over valid tokens (selection.sketch.block_means of head_reduce), times the
                    SRHT matrix (`@ p`); at full width (the default: P is the exact sketch
                    [I 0], selection.sketch_matrix) the means themselves, no product
  torch.bmm         block scores A = Qs Ks^T
  _softmax_kernel   W = softmax(s * scale * A) over the allowed (causal, valid) blocks
                    (selection.sketch.transition_rows, block_causal_mask); zeroes the density sums
  torch.bmm         R_{l-1} W (the walk; skipped for one_hop and the first sparse layer)
  _rank_kernel      per kernel query block: the walk rows (selection.walk.walk_combine), pooled over its
                    block_size sub-rows, the budget with sink, local and dense-tail blocks
                    (selection.topk.rank_blocks), the top `kept` blocks (a bisection on the scores'
                    ordered bit patterns: ties go to the lower index, as a stable sort), the
                    partial/full split against causality and padding (structural_tables), the
                    BlockMask's index lists (table_to_indices), and the kept and causal block
                    counts added (atomically; integers in fp32, so exact in any order) to the
                    density sums.  The walk and the sums share one buffer: one copy takes both

Outputs are those of selection.driver.torch_selection_tables, with the same meaning; the float sums run
in another order, so the walk matches to float32 rounding and a block whose score ties the
row's threshold to rounding may be swapped for its equal (tests/test_triton_selection.py).

With head_scoring="per_head" the block means, sketches and per-head scores are torch ops on the
layer's q and k (as selection.sketch.layer_sketch computes them), and the softmax kernel averages the
heads' softmax rows; the rest is the same.  prefill_scoring="bound" scores the query blocks'
means (the exact sketch of the parts) against the head-mean keys' block extremes
(`bucket_key_bounds`: selection.sketch.key_bounds in one launch, another read of k), one product
instead of Qs Ks^T;
per head, as torch ops like per_head's.

`selection_tables` runs on CUDA tensors, or on CPU tensors under triton's interpreter (tests).
Rows of more than MAX_BLOCKS blocks (beyond 256K tokens with 64-token blocks) are not
handled: `supported` says so and the caller keeps the torch selection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import SketchWalkConfig
from ..selection.sketch import block_means, bound_scores, exact_sketch, is_exact, key_bounds
from ..selection.topk import block_budget
from ..selection.walk import walk_combine
from .triton_runtime import HAS_TRITON, interpreted

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
    def _parts_kernel(Q, K, VALID, QP, KP, COUNTS, VALID_OUT, N_OUT, PREV, PREV_OUT,
                      sqb, sqh, sqn, skb, skh, skn, svb, svob, N, NB, HQ, HK, GQ, GK, D,
                      BS: tl.constexpr, TC: tl.constexpr, HPG: tl.constexpr, D_POW2: tl.constexpr,
                      HAS_VALID: tl.constexpr, WRITE_VALID: tl.constexpr, WRITE_N: tl.constexpr,
                      COPY_PREV: tl.constexpr, NB_POW2: tl.constexpr):
        """Program (b, i, g): the sum, over block i's valid tokens, of heads g*HPG .. g*HPG+HPG-1
        of q (g < GQ) or of heads (g-GQ)*HPG .. of k, into QP [B, GQ, NB, D] / KP [B, GK, NB, D]
        fp32.  Programs g = 0 also store the block's valid token count (COUNTS [B, NB] fp32)
        and, with WRITE_VALID, its validity (False past N) into VALID_OUT; program (0, 0, 0)
        stores N into N_OUT (WRITE_N).  Tokens at or past N, and invalid ones, are never read.
        COPY_PREV: programs (b, i, 0) also copy row i of PREV [B, NB, NB] (the previous layer's
        walk) into PREV_OUT, so that one launch writes all of the selection graph's inputs."""
        b = tl.program_id(0)
        i = tl.program_id(1)
        g = tl.program_id(2)
        d = tl.arange(0, D_POW2)
        dm = d < D
        b64 = b.to(tl.int64)
        is_q = g < GQ
        # scalars chosen by where, not in the branches: an argument equal to 1 is a constexpr
        # to Triton, and a branch may not merge it with a runtime int
        sh = tl.where(is_q, sqh, skh)
        sn = tl.where(is_q, sqn, skn)
        nh = tl.where(is_q, HQ, HK)
        h0 = tl.where(is_q, g, g - GQ) * HPG
        if is_q:
            x_ptr = Q + b64 * sqb
            out = QP + ((b64 * GQ + g) * NB + i) * D
        else:
            x_ptr = K + b64 * skb
            out = KP + ((b64 * GK + (g - GQ)) * NB + i) * D
        # a [TC, D] accumulator, reduced over its rows once at the end: a reduction per load
        # (across warps, through shared memory) held the pass to ~1.6 TB/s on an H100
        acc = tl.zeros([TC, D_POW2], tl.float32)
        cnt = tl.zeros([TC], tl.int32)
        for t0 in tl.static_range(0, BS, TC):
            tok = i * BS + t0 + tl.arange(0, TC)
            take = tok < N
            if HAS_VALID:
                take = take & (tl.load(VALID + b64 * svb + tok, mask=take, other=0) != 0)
            if WRITE_VALID:
                if g == 0:
                    tl.store(VALID_OUT + b64 * svob + tok, take.to(tl.int8))
            cnt += take.to(tl.int32)
            for hh in tl.static_range(HPG):
                h = h0 + hh
                m2 = (take & (h < nh))[:, None] & dm[None, :]
                x = tl.load(x_ptr + h.to(tl.int64) * sh + tok[:, None].to(tl.int64) * sn + d[None, :], mask=m2,
                            other=0.0)
                acc += x.to(tl.float32)
        tl.store(out + d, tl.sum(acc, 0), mask=dm)
        if g == 0:
            tl.store(COUNTS + b64 * NB + i, tl.sum(cnt, 0).to(tl.float32))
        if WRITE_N:
            if (b == 0) & (i == 0) & (g == 0):
                tl.store(N_OUT, N.to(tl.int64))
        if COPY_PREV:
            if g == 0:
                j = tl.arange(0, NB_POW2)
                row = (b64 * NB + i) * NB
                tl.store(PREV_OUT + row + j, tl.load(PREV + row + j, mask=j < NB), mask=j < NB)

    @triton.jit(do_not_specialize=["N"])
    def _key_bounds_kernel(K, VALID, OUT, skb, skh, skn, svb, N, NB, HK, D,
                           BS: tl.constexpr, TC: tl.constexpr, D_POW2: tl.constexpr, HAS_VALID: tl.constexpr):
        """Program (b, i): block i's channel-wise maximum and minimum over its valid tokens of the
        head-mean key (K [B, HK, N, D], the mean over HK heads in fp32), stored as [max, -min] in
        OUT [B, 1, NB, 2D] fp32; 0 for a block without a valid token (and past N)."""
        b = tl.program_id(0)
        i = tl.program_id(1)
        d = tl.arange(0, D_POW2)
        dm = d < D
        b64 = b.to(tl.int64)
        # [TC, D] running extremes, reduced over their rows once at the end (as in _parts_kernel)
        hi = tl.full([TC, D_POW2], float("-inf"), tl.float32)
        lo = tl.full([TC, D_POW2], float("inf"), tl.float32)
        for t0 in tl.static_range(0, BS, TC):
            tok = i * BS + t0 + tl.arange(0, TC)
            take = tok < N
            if HAS_VALID:
                take = take & (tl.load(VALID + b64 * svb + tok, mask=take, other=0) != 0)
            m2 = take[:, None] & dm[None, :]
            ptr = K + b64 * skb + tok[:, None].to(tl.int64) * skn + d[None, :]
            s = tl.zeros([TC, D_POW2], tl.float32)
            for _ in range(HK):  # the pointer moves by a head's stride (a 64-bit pointer: no overflow)
                s += tl.load(ptr, mask=m2, other=0.0).to(tl.float32)
                ptr += skh
            s = s / HK
            hi = tl.maximum(hi, tl.where(take[:, None], s, float("-inf")))
            lo = tl.minimum(lo, tl.where(take[:, None], s, float("inf")))
        kmax = tl.max(hi, 0)
        empty = kmax == float("-inf")  # no valid token: every channel's maximum is -inf
        out = OUT + (b64 * NB + i) * (2 * D)
        tl.store(out + d, tl.where(empty, 0.0, kmax), mask=dm)
        tl.store(out + D + d, tl.where(empty, 0.0, -tl.min(lo, 0)), mask=dm)

    @triton.jit
    def _sketch_kernel(QP, KP, COUNTS, P, QS, KS, NB, GQ, GK, HQ, HK, D, R,
                       D_POW2: tl.constexpr, R_POW2: tl.constexpr, RC: tl.constexpr, EXACT: tl.constexpr):
        """Program (b, i): block i's means of the head-mean q and k over its valid tokens (the
        parts' sums over groups, / (heads * count)), projected on the SRHT matrix P [D, R]; with
        EXACT (P the exact sketch [I 0], R = D_POW2) the means themselves, zero past D."""
        b = tl.program_id(0)
        i = tl.program_id(1)
        d = tl.arange(0, D_POW2)
        dm = d < D
        acc_q = tl.zeros([D_POW2], tl.float32)
        acc_k = tl.zeros([D_POW2], tl.float32)
        for g in range(GQ):
            acc_q += tl.load(QP + ((b * GQ + g) * NB + i) * D + d, mask=dm, other=0.0)
        for g in range(GK):
            acc_k += tl.load(KP + ((b * GK + g) * NB + i) * D + d, mask=dm, other=0.0)
        c = tl.maximum(tl.load(COUNTS + b * NB + i), 1.0)
        mean_q = acc_q / (c * HQ)
        mean_k = acc_k / (c * HK)
        if EXACT:
            tl.store(QS + (b * NB + i) * R + d, mean_q)
            tl.store(KS + (b * NB + i) * R + d, mean_k)
        else:
            for r0 in tl.static_range(0, R_POW2, RC):
                r = r0 + tl.arange(0, RC)
                rm = r < R
                p = tl.load(P + d[:, None] * R + r[None, :], mask=dm[:, None] & rm[None, :], other=0.0)
                tl.store(QS + (b * NB + i) * R + r, tl.sum(mean_q[:, None] * p, 0), mask=rm)
                tl.store(KS + (b * NB + i) * R + r, tl.sum(mean_k[:, None] * p, 0), mask=rm)

    @triton.jit
    def _allowed_row(COUNTS, b, i, NB, NB_POW2: tl.constexpr):
        """Block i's allowed key blocks (selection.sketch.block_causal_mask) and the valid blocks."""
        j = tl.arange(0, NB_POW2)
        inr = j < NB
        bv = (tl.load(COUNTS + b * NB + j, mask=inr, other=0.0) > 0) & inr
        allowed = (j <= i) & bv
        empty = tl.sum(allowed.to(tl.int32), 0) == 0
        return allowed | (empty & (j == i)), bv

    @triton.jit
    def _softmax_kernel(A, COUNTS, W, SUMS, NB, scale, exponent, H: tl.constexpr, NB_POW2: tl.constexpr):
        """Program (b, i): row i of W = softmax(exponent * scale * A) over its allowed blocks; with
        H > 1 (per-head scoring, A [B, H, NB, NB]) the mean of the H heads' softmax rows.
        Programs (b, 0) zero SUMS[b] and SUMS[B + b], the density sums _rank_kernel adds to."""
        b = tl.program_id(0)
        i = tl.program_id(1)
        if i == 0:
            tl.store(SUMS + b, 0.0)
            tl.store(SUMS + tl.num_programs(0) + b, 0.0)
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
                     P_CNT, P_IDX, F_CNT, F_IDX, TABLE, SUMS,
                     NB, NQ, damping, n_int, dense_below,
                     M: tl.constexpr, BS: tl.constexpr, NB_POW2: tl.constexpr, MODE: tl.constexpr,
                     SINK: tl.constexpr, LOCAL: tl.constexpr, TAIL: tl.constexpr, N_FROM_PTR: tl.constexpr,
                     WRITE_BOUNDS: tl.constexpr, SHORT_ROWS: tl.constexpr):
        """Program (b, I): kernel query block I (walk rows I*M .. I*M+M-1).  MODE 0: R = W;
        1: R = normalise(PW); 2: R = (1 - damping) W + damping normalise(PW).  Adds the row's
        kept and causal block counts to SUMS[b] and SUMS[B + b] (zeroed by _softmax_kernel;
        integers in fp32, exact below 2^24, so the order of the adds does not matter).
        WRITE_BOUNDS (nothing padded): every row's keys are [0, n); programs (b, 0) store that
        into START and END instead of reading them.  SHORT_ROWS (a padded batch): where n >=
        dense_below, a batch row with fewer than dense_below real tokens (its COUNTS summed)
        keeps every causal block (selection.topk.short_rows)."""
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
        # selection.topk.rank_blocks for this row
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
        if SHORT_ROWS:
            tokens = tl.sum(tl.load(COUNTS + b * NB + j, mask=inr, other=0.0), 0)
            kept = tl.where((tokens < dense_below) & (n >= dense_below), n_causal, kept)
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
        tl.atomic_add(SUMS + b, tl.sum((sel & bv).to(tl.int32), 0).to(tl.float32))
        tl.atomic_add(SUMS + tl.num_programs(0) + b, n_causal.to(tl.float32))
        # partial / full against causality and each row's real keys (kernels.flex.structural_tables)
        if WRITE_BOUNDS:
            start = 0
            end = n
            if qi == 0:
                tl.store(START + b, start)
                tl.store(END + b, end)
        else:
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
        ~flag, as selection.topk.table_to_indices)."""
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
    """[nb + 1] int32: the budget of a row with c causal blocks (selection.topk.block_budget).

    A constant, cached per (configuration, blocks, device).  Never stored during a CUDA-graph
    capture: captured kernels do not run then, so a table built there holds garbage until the
    graph replays.  flexwalk's own selection graph builds it in the warm-up run before its
    capture, which then reads the cached table."""
    key = (config, nb, device)
    table = _BUDGETS.get(key)
    if table is None:
        c = torch.arange(nb + 1, device=device, dtype=torch.int32)
        table = block_budget(c, top_k=config.top_k_blocks, density=config.density)
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            _BUDGETS[key] = table
    return table


# Heads summed per program of _parts_kernel, tokens per load and warps: programs = B x blocks x
# (ceil(Hq / HPG) + ceil(Hkv / HPG)), enough to keep every SM's loads in flight (the kernel
# reads all of q and k once: the selection's memory floor).  H100, 8B shape, block 128
# (docs/design-notes.md, "Head means before the graph"): 2 / 32 / 4 was the fastest of 12
# settings, 0.127 ms at 32K (2.66 TB/s; torch's `q.sum(), k.sum()` 0.137 ms, torch.mean's head
# means 0.146 ms) and 0.456 ms at 128K (2.94 TB/s); one head per program was the slowest (1.33x).
PARTS_HEADS = 2
PARTS_TOKENS = 32
PARTS_WARPS = 4


def row_warps(nb2: int) -> int:
    """Warps of the softmax and rank kernels, one row of nb2 (a power of two) blocks per program."""
    return 4 if nb2 <= 1024 else 8


def parts_groups(hq: int, hk: int, heads: int = PARTS_HEADS) -> tuple[int, int]:
    """(GQ, GK): the head groups of `heads` heads of q and k that `block_parts` sums apart."""
    return -(-hq // heads), -(-hk // heads)


def block_parts(q: torch.Tensor, k: torch.Tensor, key_valid: torch.Tensor | None, block_size: int, nb: int,
                out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                valid_out: torch.Tensor | None = None, n_out: torch.Tensor | None = None,
                prev: torch.Tensor | None = None, prev_out: torch.Tensor | None = None, *,
                heads: int = PARTS_HEADS, tokens: int = PARTS_TOKENS, warps: int = PARTS_WARPS):
    """One pass over q [B, Hq, n, D] and k [B, Hkv, n, D] (one float dtype, any strides with a
    contiguous head dim): per group of PARTS_HEADS heads, the sum of each block's valid tokens
    (key_valid [B, n] bool or None: all valid), fp32 (QP [B, GQ, nb, D], KP [B, GK, nb, D]), and
    each block's valid count (counts [B, nb] fp32), over nb >= ceil(n / block_size) blocks (zero
    past n).  `_sketch_kernel` turns them into the blocks' head-mean means and sketches.

    out: buffers to write into (the selection graph's static inputs); valid_out [B, nb *
    block_size] bool gets the validity, False past n; n_out (0-d int64) gets n; prev [B, nb, nb]
    fp32 is copied into prev_out (the graph's previous walk).  One launch.  heads / tokens /
    warps: heads summed per program, tokens per load and warps (tuning; see PARTS_HEADS)."""
    bsz, hq, n, d = q.shape
    hk = k.shape[1]
    if k.shape[0] != bsz or k.shape[2:] != (n, d) or k.dtype != q.dtype:
        raise ValueError(f"block_parts: k {tuple(k.shape)} {k.dtype} does not match q {tuple(q.shape)} {q.dtype}")
    if nb * block_size < n:
        raise ValueError(f"block_parts: nb={nb} blocks of {block_size} tokens cover fewer than n={n}")
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    gq, gk = parts_groups(hq, hk, heads)
    if out is None:
        f32 = dict(device=q.device, dtype=torch.float32)
        out = (torch.empty(bsz, gq, nb, d, **f32), torch.empty(bsz, gk, nb, d, **f32), torch.empty(bsz, nb, **f32))
    qp, kp, counts = out
    valid = None if key_valid is None else key_valid.contiguous().view(torch.uint8)
    vo = None if valid_out is None else valid_out.view(torch.uint8)
    if (prev is None) != (prev_out is None):
        raise ValueError("block_parts: prev and prev_out go together")
    if prev is not None:
        if prev.shape != (bsz, nb, nb) or prev_out.shape != prev.shape or not prev_out.is_contiguous():
            raise ValueError(f"block_parts: prev {tuple(prev.shape)} / prev_out {tuple(prev_out.shape)} must be "
                             f"({bsz}, {nb}, {nb}), prev_out contiguous")
        prev = prev.contiguous()
    d2 = _pow2(d)
    tc = min(block_size, tokens, max(8, 4096 // d2))
    _parts_kernel[(bsz, nb, gq + gk)](
        q, k, valid if valid is not None else counts, qp, kp, counts, vo if vo is not None else counts,
        n_out if n_out is not None else counts, prev if prev is not None else counts,
        prev_out if prev_out is not None else counts,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        0 if valid is None else valid.stride(0), 0 if vo is None else vo.stride(0), n, nb, hq, hk, gq, gk, d,
        BS=block_size, TC=tc, HPG=heads, D_POW2=d2, HAS_VALID=valid is not None,
        WRITE_VALID=vo is not None, WRITE_N=n_out is not None, COPY_PREV=prev is not None,
        NB_POW2=_pow2(nb) if prev is not None else 1, num_warps=warps,
    )
    return qp, kp, counts


def _check(config: SketchWalkConfig, n: int, n_pad: int) -> tuple[int, int, int]:
    bs, qb = config.block_size, config.q_block
    nb, nq = n_pad // bs, n_pad // qb
    if n_pad % qb or n > n_pad:
        raise ValueError(f"n_pad={n_pad} must be a multiple of the query block ({qb}) and >= the {n} tokens given")
    if nb > MAX_BLOCKS:
        raise ValueError(f"n_pad={n_pad} gives {nb} blocks of {bs} tokens; the Triton selection handles <= {MAX_BLOCKS}")
    return nb, nq, qb // bs


def _bounds(key_valid: torch.Tensor | None, bsz: int, dev) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Each row's real keys [start, end) from the validity ([B, n] bool); None without any (then
    they are [0, n), which _rank_kernel writes itself)."""
    if key_valid is None:
        return None
    valid = key_valid.contiguous().view(torch.uint8)
    start, end = torch.empty(bsz, device=dev, dtype=torch.int32), torch.empty(bsz, device=dev, dtype=torch.int32)
    _bounds_kernel[(bsz,)](valid, start, end, valid.stride(0), valid.shape[1], CHUNK=1024)
    return start, end


def _sketches(qp, kp, counts, hq: int, hk: int, p: torch.Tensor):
    """`block_parts`' sums -> the blocks' sketches (qs, ks) [B, nb, r] fp32."""
    bsz, gq, nb, d = qp.shape
    r = p.shape[1]
    qs = torch.empty(bsz, nb, r, device=qp.device, dtype=torch.float32)
    ks = torch.empty_like(qs)
    d2, r2 = _pow2(d), _pow2(r)
    exact = is_exact(d, r)  # P is then taken as the exact sketch [I 0] (selection.sketch_matrix)
    if exact and r != d2:
        raise ValueError(f"the sketch P [{d}, {r}] is wider than the padded head dim {d2}")
    rc = min(r2, max(16, 8192 // d2))
    _sketch_kernel[(bsz, nb)](qp, kp, counts, p, qs, ks, nb, gq, kp.shape[1], hq, hk, d, r,
                              D_POW2=d2, R_POW2=r2, RC=rc, EXACT=exact)
    return qs, ks


def selection_tables(qm: torch.Tensor, km: torch.Tensor, p: torch.Tensor, prev_walk: torch.Tensor | None,
                     key_valid: torch.Tensor | None, config: SketchWalkConfig, scale: float | None, n_pad: int,
                     seq_len: int | torch.Tensor | None = None, row_warps: int | None = None):
    """selection.driver.torch_selection_tables in Triton.

    qm, km: [B, Hq, n, D], [B, Hkv, n, D] over n <= n_pad tokens, one float dtype.  Head-mean
    scoring sums each block's tokens and heads in one pass (`block_parts`, no [B, n, D] head
    means); tests pass head means (H = 1, n = n_pad, zero past the real length).  With
    head_scoring="per_head" each head's block means and scores are torch ops, then the same
    kernels.  p: [D, r] SRHT matrix; prev_walk: [B, nb, nb]
    fp32 R_{l-1} over nb = n_pad / block_size blocks, or None (at full width, r = the padded
    head dim, p is taken as the exact sketch [I 0]: any P with P P^T = I gives the same scores,
    and the kernel skips the product); key_valid: [B, n] bool or None;
    seq_len: real tokens (a 0-d tensor inside a graph, default n).  Returns (partial counts,
    partial indices, full counts, full indices, selection table, start, end, walk, kept, causal)
    over n_pad tokens: counts [B, nq] int32, indices [B, nq, nb] int32, table [B, nq, nb] bool,
    start / end [B] int32, walk [B, nb, nb] fp32, kept / causal [B] fp32.  No host sync.
    row_warps: warps of the softmax and rank kernels (None: `row_warps` of the row width).
    """
    bsz, hq, n, d = qm.shape
    hk = km.shape[1]
    nb, _, _ = _check(config, n, n_pad)
    seq_len = n if seq_len is None else seq_len
    p = p.float().contiguous()
    bounds = _bounds(key_valid, bsz, qm.device)
    bound = config.prefill_scoring == "bound"
    if config.head_scoring == "per_head":  # each head's own (selection.sketch.layer_sketch): scores [B, Hq, nb, nb]
        q_means, counts = block_means(qm, config.block_size, key_valid)
        grow = nb - q_means.shape[2]  # blocks of the bucket past the real ones: empty
        if bound:  # each query head's block means against its KV head's key extremes
            a = bound_scores(q_means, key_bounds(km, config.block_size, key_valid, "per_head"))
            a = F.pad(a, (0, grow, 0, grow)).contiguous()
        else:
            k_means, _ = block_means(km, config.block_size, key_valid)
            qs = F.pad(q_means, (0, 0, 0, grow)) @ p
            ks = F.pad(k_means, (0, 0, 0, grow)) @ p
            r = p.shape[1]
            a = torch.matmul(qs.reshape(bsz, hk, (hq // hk) * nb, r), ks.transpose(-1, -2)).reshape(bsz, hq, nb, nb)
        counts = F.pad(counts.expand(bsz, -1), (0, grow)).contiguous()
        return _rank_tables(a, hq, counts, bounds, prev_walk, config, scale, d, n_pad, seq_len, row_warps)
    qp, kp, counts = block_parts(qm, km, key_valid, config.block_size, nb)
    kb = None
    if bound:  # the head-mean keys' extremes; the query blocks' means need the exact sketch
        kb = bucket_key_bounds(km, config.block_size, key_valid, nb)
        p = exact_sketch(d, qm.device)
    return parts_selection_tables(qp, kp, counts, hq, hk, p, prev_walk, bounds, config, scale, n_pad, seq_len,
                                  row_warps, k_bounds=kb)


def bucket_key_bounds(k: torch.Tensor, block_size: int, key_valid: torch.Tensor | None, nb: int,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """prefill_scoring="bound": selection.sketch.key_bounds of the head-mean keys, [B, 1, nb, 2D]
    fp32 over nb >= ceil(n / block_size) blocks (0 past the real ones), from k [B, Hkv, n, D] (a
    contiguous head dim) and key_valid [B, n] bool or None, in one launch that reads k once;
    written into out (the selection graph's static input) when given."""
    bsz, hk, n, d = k.shape
    if nb * block_size < n:
        raise ValueError(f"bucket_key_bounds: nb={nb} blocks of {block_size} tokens cover fewer than n={n}")
    if out is None:
        out = torch.empty(bsz, 1, nb, 2 * d, device=k.device, dtype=torch.float32)
    elif out.shape != (bsz, 1, nb, 2 * d) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"bucket_key_bounds: out {tuple(out.shape)} {out.dtype} must be contiguous fp32 "
                         f"({bsz}, 1, {nb}, {2 * d})")
    k = k if k.stride(-1) == 1 else k.contiguous()
    valid = None if key_valid is None else key_valid.contiguous().view(torch.uint8)
    d2 = _pow2(d)
    _key_bounds_kernel[(bsz, nb)](k, valid if valid is not None else out, out, k.stride(0), k.stride(1), k.stride(2),
                                  0 if valid is None else valid.stride(0), n, nb, hk, d, BS=block_size,
                                  TC=min(block_size, max(8, 2048 // d2)), D_POW2=d2, HAS_VALID=valid is not None)
    return out


def parts_selection_tables(qp: torch.Tensor, kp: torch.Tensor, counts: torch.Tensor, hq: int, hk: int,
                           p: torch.Tensor, prev_walk: torch.Tensor | None, bounds, config: SketchWalkConfig,
                           scale: float | None, n_pad: int, seq_len: int | torch.Tensor, row_warps: int | None = None,
                           k_bounds: torch.Tensor | None = None):
    """`selection_tables` from `block_parts`' sums (what the selection graph captures: its static
    inputs are the parts, filled by one `block_parts` launch before each replay).  bounds:
    (start, end) [B] int32, or the validity [B, n_pad] bool (the bounds kernel runs), or None
    (nothing padded: [0, seq_len)).  k_bounds (prefill_scoring="bound"): `bucket_key_bounds`
    [B, 1, nb, 2D], scored against the query blocks' means (p must then be the exact sketch).
    `_rank_tables` checks n_pad."""
    d = qp.shape[-1]
    if isinstance(bounds, torch.Tensor):
        bounds = _bounds(bounds, qp.shape[0], qp.device)
    if k_bounds is not None and not is_exact(d, p.shape[1]):
        raise ValueError(f"bound scoring reads the query blocks' means: p must be the exact sketch, not [{d}, {p.shape[1]}]")
    qs, ks = _sketches(qp, kp, counts, hq, hk, p.float().contiguous())
    if k_bounds is not None:
        a = bound_scores(qs[:, None, :, :d], k_bounds)[:, 0]
    else:
        a = torch.bmm(qs, ks.transpose(1, 2))
    return _rank_tables(a, 1, counts, bounds, prev_walk, config, scale, d, n_pad, seq_len, row_warps)


def _rank_tables(a, heads: int, counts, bounds, prev_walk, config: SketchWalkConfig, scale, d: int, n_pad: int,
                 seq_len, warps: int | None = None):
    """Scores a [B, heads, nb, nb] (or [B, nb, nb]) -> the tables: softmax, walk, rank.  bounds:
    (start, end) [B] int32, or None: [0, n) for every row, written by _rank_kernel."""
    bsz, dev = a.shape[0], a.device
    nb, nq, m = _check(config, 0, n_pad)
    bs = config.block_size
    scale = d**-0.5 if scale is None else float(scale)
    f32 = dict(device=dev, dtype=torch.float32)
    i32 = dict(device=dev, dtype=torch.int32)

    # W = softmax over the allowed blocks of the scaled scores (the heads' mean for per_head)
    nb2 = _pow2(nb)
    warps = warps or row_warps(nb2)
    w = torch.empty(bsz, nb, nb, **f32)
    tail = torch.empty(bsz * (nb * nb + 2), **f32)  # the walk and the density sums: one buffer, one copy
    walk, kept, causal = split_tail(tail, bsz, nb)
    sums = tail[bsz * nb * nb:]  # kept then causal, as _softmax_kernel and _rank_kernel index them
    _softmax_kernel[(bsz, nb)](a, counts, w, sums, nb, scale, float(config.sparsity_exponent), H=heads, NB_POW2=nb2,
                               num_warps=warps)

    # the walk, the budget, the top blocks and the BlockMask's lists
    mode = 0
    pw = w
    if prev_walk is not None and config.walk != "one_hop":
        mode = 1 if config.walk == "walk" else 2
        # walk_steps > 1: all but the last step here (selection.walk.walk_combine), the last in _rank_kernel
        prev_walk = walk_combine(w, prev_walk, w, config.walk, float(config.damping), config.walk_steps - 1)
        pw = torch.bmm(prev_walk, w)
    p_cnt, f_cnt = torch.empty(bsz, nq, **i32), torch.empty(bsz, nq, **i32)
    p_idx, f_idx = torch.empty(bsz, nq, nb, **i32), torch.empty(bsz, nq, nb, **i32)
    table = torch.empty(bsz, nq, nb, device=dev, dtype=torch.bool)
    start, end = bounds if bounds is not None else (torch.empty(bsz, **i32), torch.empty(bsz, **i32))
    n_ptr = seq_len if isinstance(seq_len, torch.Tensor) else start
    dense_below = config.min_sparse_length(dev) if bounds is not None else 0  # selection.topk.short_rows
    _rank_kernel[(bsz, nq)](
        w, pw, walk, counts, budget_table(config, nb, dev), start, end, n_ptr,
        p_cnt, p_idx, f_cnt, f_idx, table.view(torch.int8), sums,
        nb, nq, float(config.damping), 0 if isinstance(seq_len, torch.Tensor) else int(seq_len), dense_below,
        M=m, BS=bs, NB_POW2=nb2, MODE=mode, SINK=config.sink_blocks, LOCAL=config.local_blocks * m,
        TAIL=config.dense_tail_blocks, N_FROM_PTR=isinstance(seq_len, torch.Tensor),
        WRITE_BOUNDS=bounds is None, SHORT_ROWS=dense_below > 0, num_warps=warps,
    )
    return p_cnt, p_idx, f_cnt, f_idx, table, start, end, walk, kept, causal


def split_tail(tail: torch.Tensor, bsz: int, nb: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_rank_tables`' one fp32 buffer -> (walk [B, nb, nb], kept [B], causal [B]) views: the
    selection graph copies the three out of its replay's buffers in one copy."""
    m = bsz * nb * nb
    return tail[:m].view(bsz, nb, nb), tail[m:m + bsz], tail[m + bsz:]
