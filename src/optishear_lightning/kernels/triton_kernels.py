"""Triton kernels: fused pruning scores with exact lowest-``k`` and N:M selection.

This module imports Triton, so :mod:`optishear_lightning.kernels.fused` imports it lazily, on
the first kernel call. Whether Triton's CPU interpreter is used is decided when the kernels
below are decorated, i.e. when this module is first imported: ``TRITON_INTERPRET=1`` must be in
the environment by then (:data:`INTERPRETED` records what happened).

Scores. ``S_ij = C(C(N_ij * T(|W_ij|)) * x_j)``: ``T`` is identity, ``sqrt`` (``sqrt_rn``) or
square (one IEEE multiply, which is what ``torch.square`` computes); ``N_ij`` is a scalar, a
per-row or per-column vector, the RIA sum of two quotients, or ``1 / max(r_i + c_j, tiny)``
(``div_rn``); ``x`` a per-input-channel vector; ``C`` the optional clamp to the finite float32
range (OptiShear's meta metric clamps, the plain metrics do not). Every vector is computed by
the same PyTorch code as the reference scores and passed in, so every float32 operation here is
a single correctly rounded one in the reference's order: the scores are bit-identical to
PyTorch's. Precomputed score tensors can be passed instead (``SOURCE=1``: select only).

Selection. Rows: the float32 scores become order-preserving ``uint32`` keys (``-0.0`` first
made ``+0.0``, since PyTorch compares them equal); the ``k``-th smallest key ``t`` of the row is
found by fixing its 32 bits from the top, each bit by one count of the keys below a candidate;
then everything below ``t`` is pruned, plus the leftmost ties of ``t`` that are still needed
(a prefix count of the ties). That is the first ``k`` of a stable ascending sort, the engine's
tie-break. Rows up to :data:`MAX_RESIDENT` long are held in registers (one read of ``W``);
optionally (``select="two_level"``, :func:`_select_two_level`) the whole-row counting stops
once the bucket of keys sharing ``t``'s fixed bits is small, which is copied out in any order
with atomic slots, and the remaining bits are counted over it (ties then pruned leftmost first
without a prefix sum, :func:`_prune_leftmost`);
after :data:`COARSE_BITS` bits the few keys that share ``t``'s top bits are copied to a per-row
scratch and the last bits are counted over those only (a bucket larger than the scratch, i.e.
massive ties, finishes over the whole row). Optionally (``select="snap"``,
:func:`_select_snap`) ``t`` is bracketed between two actual keys instead, each pass counting
below the midpoint and snapping the bracket onto the nearest keys on either side of it (one
fused block-wide reduction a pass, typically ~15 passes instead of 32). Longer rows are
streamed in chunks, recomputing the scores on every pass (correct, slower).
N:M: each weight's rank in its group of ``M`` under the same stable order is counted directly
(``M`` comparisons per weight), and ranks below ``M - N`` are pruned; for ``M = 4`` (by
default: ``nm_impl="split4"``, :func:`_nm4_kernel`) over a contiguous tile split into the
four members of each group, with explicit comparisons and no ``M x M`` tile.

Rows (row mode) or groups (N:M mode) whose scores contain a NaN are not written; the number of
NaN scores is added to a counter so that the caller can raise like the reference does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

__all__ = [
    "INTERPRETED",
    "MAX_RESIDENT",
    "NM_IMPLS",
    "NORM_CODES",
    "SELECTS",
    "TRANSFORM_CODES",
    "default_row_knobs",
    "launch_nm",
    "launch_rows",
]

#: The k-th-key searches of resident rows (``launch_rows(select=...)``), default first; the
#: kernel's ``SELECT`` code is the index here.
SELECTS = ("bisect", "two_level", "snap")

#: The N:M kernels (``launch_nm(nm_impl=...)``): the ``M x M`` pairwise rank tile (any ``M``;
#: the default for ``M != 4``), or ``M = 4`` only (the default there): a contiguous tile split
#: into a group's four members, 1.6-1.9x the pairwise kernel on LLaMA-3-8B shapes on the H200
#: (benchmarks/results/kernels_sweep_h200.md).
NM_IMPLS = ("pairwise", "split4")

#: Weights a program and warps of the ``split4`` kernel by default: the fastest of the H200
#: sweep over blocks 512-4096 and 1-8 warps (16 bfloat16 weights a thread).
NM4_BLOCK = 2048
NM4_WARPS = 2

#: Longest row that is selected with the whole row in registers. 16384 keys over 16 warps are
#: 32 registers a thread; LLaMA-3-8B's longest row (down_proj, 14336) fits.
MAX_RESIDENT = 16384

#: Key bits fixed by counting over the whole row before the candidate bucket is copied out:
#: 12 bits (sign, exponent, 3 mantissa bits) leave an eighth of a binade, a few percent of a
#: row of weight-like scores.
COARSE_BITS = 12

#: Codes of the compile-time metric parts (see the module docstring).
TRANSFORM_CODES = {"identity": 0, "sqrt": 1, "square": 2}
NORM_CODES = {"none": 0, "scalar": 1, "row": 2, "column": 3, "relative": 4, "ria": 5}

# Both are exact float32 values: the smallest normal float and the largest finite float
# (torch.finfo(torch.float32).tiny / .max), the reference's clamp bounds.
TINY: tl.constexpr = tl.constexpr(1.1754943508222875e-38)
BIG: tl.constexpr = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _clamp_big(v):
    # torch.clamp(v, -big, big), written with comparisons so that a NaN stays NaN as in torch.
    v = tl.where(v > BIG, BIG, v)
    return tl.where(v < -BIG, -BIG, v)


@triton.jit
def _score(
    w_ptr,
    s_ptr,
    x_ptr,
    nrow_ptr,
    ncol_ptr,
    nscal_ptr,
    row,
    cols,
    valid,
    stride_w,
    stride_s,
    SOURCE: tl.constexpr,
    TRANSFORM: tl.constexpr,
    NORM: tl.constexpr,
    HAS_X: tl.constexpr,
    CLAMP: tl.constexpr,
):
    """Float32 scores of ``row`` at columns ``cols`` (any shape), bit-identical to torch."""
    if SOURCE == 1:
        s = tl.load(s_ptr + row * stride_s + cols, mask=valid, other=0.0).to(tl.float32)
    else:
        w = tl.load(w_ptr + row * stride_w + cols, mask=valid, other=0.0).to(tl.float32)
        w = tl.abs(w)
        if TRANSFORM == 1:
            t = tl.sqrt_rn(w)
        elif TRANSFORM == 2:
            t = w * w
        else:
            t = w
        if NORM == 1:
            s = tl.load(nscal_ptr) * t
        elif NORM == 2:
            s = tl.load(nrow_ptr + row) * t
        elif NORM == 3:
            s = tl.load(ncol_ptr + cols, mask=valid, other=1.0) * t
        elif NORM == 4:
            # 1 / clamp_min(rowsum_i + colsum_j, tiny), as NORMALISERS["relative_sum"] does on
            # the broadcast sum (torch's reciprocal is a correctly rounded 1 / d).
            d = tl.load(nrow_ptr + row) + tl.load(ncol_ptr + cols, mask=valid, other=1.0)
            d = tl.where(d < TINY, TINY, d)
            s = tl.div_rn(1.0, d) * t
        elif NORM == 5:
            # RIA: |W| / colsum_j + |W| / rowsum_i, sums already clamped by torch.
            c = tl.load(ncol_ptr + cols, mask=valid, other=1.0)
            r = tl.load(nrow_ptr + row)
            s = tl.div_rn(t, c) + tl.div_rn(t, r)
        else:
            s = t
        if CLAMP:
            s = _clamp_big(s)
        if HAS_X:
            s = s * tl.load(x_ptr + cols, mask=valid, other=0.0)
            if CLAMP:
                s = _clamp_big(s)
    return s


@triton.jit
def _keys(s, valid):
    """Order-preserving uint32 keys of float32 scores; padding gets the largest key."""
    s = tl.where(s == 0.0, 0.0, s)  # -0.0 -> +0.0: torch's comparisons treat them as equal
    bits = s.to(tl.uint32, bitcast=True)
    # Negative floats: flip every bit (larger magnitude = smaller); others: set the sign bit.
    key = bits ^ tl.where((bits >> 31) != 0, 0xFFFFFFFF, 0x80000000)
    return tl.where(valid, key, 0xFFFFFFFF)


@triton.jit
def _select_two_level(key, k, counter, scratch, BLOCK: tl.constexpr, SMALL: tl.constexpr):
    """k-th smallest key ``t`` of a resident row, ``count(key < t)`` and ``count(key == t)``.

    Phase 1 fixes the bits of ``t`` from the top by counting over the whole row, and keeps
    ``lo = count(key < t)`` and ``hi = count(key < t + 2 * bit)``: ``hi - lo`` is the size of
    the bucket of keys that share ``t``'s fixed bits, known without extra counting. As soon as
    it is at most ``SMALL`` (typically after 10-12 bits), the bucket is copied (in any order:
    slots from an atomic counter, no prefix sum) to the row's scratch, and phase 2 fixes the
    remaining bits by counting over those ``SMALL`` keys only (a few a thread).
    """
    t = tl.full([], 0, tl.uint32)
    bit = tl.full([], 0x80000000, tl.uint32)
    lo = tl.full([], 0, tl.int32)
    hi = tl.full([], BLOCK, tl.int32)  # all keys, padding included, are < 2**32
    used = tl.full([], 0, tl.int32)
    while (hi - lo > SMALL) & (used < 32):
        cand = t | bit
        below = tl.sum((key < cand).to(tl.int32), axis=0)
        take = below < k
        t = tl.where(take, cand, t)
        lo = tl.where(take, below, lo)
        hi = tl.where(take, hi, below)
        bit = bit >> 1
        used += 1
    if used < 32:
        # used >= 1 here (hi - lo = BLOCK > SMALL at the start), so bit << 1 does not wrap.
        in_bucket = (key ^ t) < (bit << 1)
        tl.debug_barrier()  # the counter's zero (stored at the start) before any increment
        slot = tl.atomic_add(
            counter + tl.zeros_like(key).to(tl.int32), 1, mask=in_bucket, sem="relaxed"
        )
        tl.store(scratch + slot, key.to(tl.int32, bitcast=True), mask=in_bucket)
        tl.debug_barrier()  # every thread's scratch writes visible to the whole block
        small_offs = tl.arange(0, SMALL)
        small = tl.load(scratch + small_offs, mask=small_offs < hi - lo, other=-1)
        small = small.to(tl.uint32, bitcast=True)  # padding 0xFFFFFFFF: never below a cand
        below_bucket = lo
        for _ in range(32 - used):
            cand = t | bit
            below = below_bucket + tl.sum((small < cand).to(tl.int32), axis=0)
            take = below < k
            t = tl.where(take, cand, t)
            lo = tl.where(take, below, lo)
            bit = bit >> 1
        n_tied = tl.sum((small == t).to(tl.int32), axis=0)
    else:  # all 32 bits fixed over the whole row (massive ties): the bucket is t's ties
        n_tied = hi - lo
    return t, lo, n_tied


@triton.jit
def _sum_max_min(n1, max1, min1, n2, max2, min2):
    """Combine of a fused block-wide reduction: a sum, a maximum and a minimum at once."""
    return n1 + n2, tl.maximum(max1, max2), tl.minimum(min1, min2)


@triton.jit
def _reduce_sum_max_min(flags, for_max, for_min, FUSED: tl.constexpr):
    """``sum(flags)`` (int32), ``max(for_max)``, ``min(for_min)`` of 1-D blocks."""
    if FUSED:  # one block-wide reduction of three values
        n, mx, mn = tl.reduce((flags.to(tl.int32), for_max, for_min), 0, _sum_max_min)
    else:  # three (fast in Triton's interpreter, whose tuple reduction is a Python loop)
        n = tl.sum(flags.to(tl.int32), axis=0)
        mx = tl.max(for_max, axis=0)
        mn = tl.min(for_min, axis=0)
    return n, mx, mn


@triton.jit
def _select_snap(key, k, kmin, kmax, n_valid, FUSED: tl.constexpr):
    """k-th smallest key ``t`` of a resident row, ``count(key < t)`` and ``count(key == t)``.

    Bisection over the key range whose bracket snaps onto actual keys. Invariant (``k > 0``):
    ``lo`` and ``hi - 1`` are keys of the row and ``c_lo = count(key < lo) < k <= c_hi =
    count(key < hi)``, from ``lo = min``, ``hi = max + 1``. A pass counts the keys below the
    midpoint ``cand`` and, in the same reduction, finds the largest key below it and the
    smallest key at or above it (padding ``0xFFFFFFFF`` is never below a candidate, which is
    at most the largest valid key, and never the minimum above it unless that key is
    ``0xFFFFFFFF`` too); the bracket then jumps to those keys. Every pass shrinks
    ``hi - lo`` (``lo < cand < hi``), and the loop ends with ``hi = lo + 1``: ``t = lo``, and
    no key lies strictly between ``t`` and ``hi``, so ``c_hi - c_lo`` keys equal ``t``.
    Bounds are int64 (``hi`` can be ``2**32``); the keys are compared as uint32.
    ``k == 0``: no pass, ``t`` is the smallest key and nothing is below it.
    """
    lo = kmin.to(tl.int64)
    hi = tl.where(k > 0, kmax.to(tl.int64) + 1, lo + 1)
    c_lo = tl.full([], 0, tl.int32)
    c_hi = tl.full([], 0, tl.int32) + n_valid
    while hi - lo > 1:
        cand = ((lo + hi) >> 1).to(tl.uint32)  # lo < cand < hi, so cand < 2**32
        lt = key < cand
        c, mx, mn = _reduce_sum_max_min(
            lt,
            tl.where(lt, key, tl.zeros_like(key)),
            tl.where(lt, tl.full(key.shape, 0xFFFFFFFF, tl.uint32), key),
            FUSED,
        )
        take = c < k  # t >= cand: count(key < mn) = c, as no key lies in [cand, mn)
        lo = tl.where(take, mn.to(tl.int64), lo)
        c_lo = tl.where(take, c, c_lo)
        hi = tl.where(take, hi, mx.to(tl.int64) + 1)  # else t <= mx: count(key <= mx) = c
        c_hi = tl.where(take, c_hi, c)
    return lo.to(tl.uint32), c_lo, c_hi - c_lo


@triton.jit
def _prune_leftmost(key, t, need, n_tied, offs, BLOCK: tl.constexpr, LOG_BLOCK: tl.constexpr):
    """Prune mask: every key below ``t`` and the ``need`` leftmost of the ``n_tied`` ties."""
    below = key < t
    tied = key == t
    if need >= n_tied:  # the usual case (one tie, needed): every tie goes
        prune = below | tied
    elif need <= 0:  # k = 0
        prune = below
    else:
        # The need-th tie's column c is the largest c with count(ties left of c) < need:
        # fixed bit by bit like t (no prefix sum over the row; only tie-heavy rows get here).
        c = tl.full([], 0, tl.int32)
        col_bit = tl.full([], BLOCK // 2, tl.int32)
        for _ in range(LOG_BLOCK):
            cand = c | col_bit
            left = tl.sum((tied & (offs < cand)).to(tl.int32), axis=0)
            c = tl.where(left < need, cand, c)
            col_bit = col_bit >> 1
        prune = below | (tied & (offs <= c))
    return prune


@triton.jit
def _row_kernel(
    w_ptr,
    s_ptr,
    keep_ptr,
    nan_ptr,
    scratch_ptr,
    counter_ptr,
    x_ptr,
    nrow_ptr,
    ncol_ptr,
    nscal_ptr,
    n_cols,
    k,
    stride_w,
    stride_s,
    stride_k,
    SOURCE: tl.constexpr,
    TRANSFORM: tl.constexpr,
    NORM: tl.constexpr,
    HAS_X: tl.constexpr,
    CLAMP: tl.constexpr,
    WRITE_W: tl.constexpr,
    WRITE_KEEP: tl.constexpr,
    RESIDENT: tl.constexpr,
    BLOCK: tl.constexpr,
    SMALL: tl.constexpr,
    COARSE_BITS: tl.constexpr,
    SELECT: tl.constexpr,
    LOG_BLOCK: tl.constexpr,
    FUSED_REDUCE: tl.constexpr,
):
    """One program per row: prune the ``k`` lowest scores, ties to the lowest column."""
    row = tl.program_id(0).to(tl.int64)
    if RESIDENT and SELECT != 0:  # "two_level" (1) or "snap" (2)
        offs = tl.arange(0, BLOCK)
        valid = offs < n_cols
        if SELECT == 1:
            counter = counter_ptr + row
            tl.store(counter, 0)  # bucket slot counter, used after the barriers below
        s = _score(
            w_ptr, s_ptr, x_ptr, nrow_ptr, ncol_ptr, nscal_ptr, row, offs, valid,
            stride_w, stride_s, SOURCE, TRANSFORM, NORM, HAS_X, CLAMP,
        )  # fmt: skip
        if SELECT == 1:
            n_nan = tl.sum(((s != s) & valid).to(tl.int32), axis=0)
            key = _keys(s, valid)
            t, n_below, n_tied = _select_two_level(
                key, k, counter, scratch_ptr + row * SMALL, BLOCK, SMALL
            )
        else:
            key = _keys(s, valid)
            # One pass: the NaN count, the largest valid key and the smallest key (padding
            # keys are the largest possible: no mask needed for the minimum).
            n_nan, kmax, kmin = _reduce_sum_max_min(
                (s != s) & valid, tl.where(valid, key, tl.zeros_like(key)), key, FUSED_REDUCE
            )
            t, n_below, n_tied = _select_snap(key, k, kmin, kmax, n_cols, FUSED_REDUCE)
        prune = _prune_leftmost(key, t, k - n_below, n_tied, offs, BLOCK, LOG_BLOCK)
        inb = n_cols > offs
        if WRITE_W:  # noqa: SIM102 (compile-time flag, then a runtime condition)
            if n_nan == 0:
                w_row = (w_ptr + offs) + row * stride_w
                w = tl.load(w_row, mask=inb)
                tl.store(w_row, tl.where(prune, tl.zeros_like(w), w), mask=inb)
        if WRITE_KEEP:
            tl.store((keep_ptr + offs) + row * stride_k, prune == 0, mask=inb)
    elif RESIDENT:
        offs = tl.arange(0, BLOCK)
        valid = offs < n_cols
        s = _score(
            w_ptr, s_ptr, x_ptr, nrow_ptr, ncol_ptr, nscal_ptr, row, offs, valid,
            stride_w, stride_s, SOURCE, TRANSFORM, NORM, HAS_X, CLAMP,
        )  # fmt: skip
        n_nan = tl.sum(((s != s) & valid).to(tl.int32), axis=0)
        key = _keys(s, valid)
        # The k-th smallest key t is the largest t with count(key < t) < k: fix its bits from
        # the top, keeping each bit whose candidate still has fewer than k keys below it.
        t = tl.full([], 0, tl.uint32)
        bit = tl.full([], 0x80000000, tl.uint32)
        for _ in range(COARSE_BITS):
            cand = t | bit
            below_cand = tl.sum((key < cand).to(tl.int32), axis=0)
            t = tl.where(below_cand < k, cand, t)
            bit = bit >> 1
        if COARSE_BITS < 32:
            # t now lies in the bucket of keys that share its top COARSE_BITS bits, typically
            # a few percent of the row. Copy that bucket to scratch once; the remaining bits
            # then need counts over the bucket only (plus the keys below it).
            in_bucket = (key ^ t) < (bit << 1)
            n_bucket = tl.sum(in_bucket.to(tl.int32), axis=0)
            if n_bucket <= SMALL:
                slot = tl.cumsum(in_bucket.to(tl.int32), axis=0) - 1
                scratch = scratch_ptr + row * SMALL
                tl.store(scratch + slot, key.to(tl.int32, bitcast=True), mask=in_bucket)
                tl.debug_barrier()  # every thread's scratch writes visible to the whole block
                small_offs = tl.arange(0, SMALL)
                small = tl.load(scratch + small_offs, mask=small_offs < n_bucket, other=-1)
                small = small.to(tl.uint32, bitcast=True)  # padding 0xFFFFFFFF: never counted
                n_lower = tl.sum((key < t).to(tl.int32), axis=0)
                for _ in range(32 - COARSE_BITS):
                    cand = t | bit
                    below_cand = n_lower + tl.sum((small < cand).to(tl.int32), axis=0)
                    t = tl.where(below_cand < k, cand, t)
                    bit = bit >> 1
            else:  # a bucket too large for the scratch (massive ties): the whole row again
                for _ in range(32 - COARSE_BITS):
                    cand = t | bit
                    below_cand = tl.sum((key < cand).to(tl.int32), axis=0)
                    t = tl.where(below_cand < k, cand, t)
                    bit = bit >> 1
        below = key < t
        need = k - tl.sum(below.to(tl.int32), axis=0)
        tied = key == t
        # Leftmost ties first: a tie is pruned while its running count is within `need`.
        prune = below | (tied & (tl.cumsum(tied.to(tl.int32), axis=0) <= need))
        # Fresh address arithmetic (not the loads'), so that the compiler does not keep 64-bit
        # pointers of the whole row alive through the loops above.
        inb = n_cols > offs
        if WRITE_W:  # noqa: SIM102 (compile-time flag, then a runtime condition)
            if n_nan == 0:
                # Reload the row (an L1/L2 hit) and write it whole: vector stores of full
                # sectors instead of one scattered 2-byte store per pruned weight.
                w_row = (w_ptr + offs) + row * stride_w
                w = tl.load(w_row, mask=inb)
                tl.store(w_row, tl.where(prune, tl.zeros_like(w), w), mask=inb)
        if WRITE_KEEP:
            tl.store((keep_ptr + offs) + row * stride_k, prune == 0, mask=inb)
    else:
        # Rows too long for registers: stream chunks of BLOCK, recomputing the scores on each
        # of the 35 passes (W stays in L2 between passes; only rows > MAX_RESIDENT get here).
        n_nan = tl.full([], 0, tl.int32)
        for c0 in range(0, n_cols, BLOCK):
            offs = c0 + tl.arange(0, BLOCK)
            valid = offs < n_cols
            s = _score(
                w_ptr, s_ptr, x_ptr, nrow_ptr, ncol_ptr, nscal_ptr, row, offs, valid,
                stride_w, stride_s, SOURCE, TRANSFORM, NORM, HAS_X, CLAMP,
            )  # fmt: skip
            n_nan += tl.sum(((s != s) & valid).to(tl.int32), axis=0)
        t = tl.full([], 0, tl.uint32)
        bit = tl.full([], 0x80000000, tl.uint32)
        for _ in range(32):
            cand = t | bit
            below_cand = tl.full([], 0, tl.int32)
            for c0 in range(0, n_cols, BLOCK):
                offs = c0 + tl.arange(0, BLOCK)
                valid = offs < n_cols
                s = _score(
                    w_ptr, s_ptr, x_ptr, nrow_ptr, ncol_ptr, nscal_ptr, row, offs, valid,
                    stride_w, stride_s, SOURCE, TRANSFORM, NORM, HAS_X, CLAMP,
                )  # fmt: skip
                below_cand += tl.sum((_keys(s, valid) < cand).to(tl.int32), axis=0)
            t = tl.where(below_cand < k, cand, t)
            bit = bit >> 1
        n_below = tl.full([], 0, tl.int32)
        for c0 in range(0, n_cols, BLOCK):
            offs = c0 + tl.arange(0, BLOCK)
            valid = offs < n_cols
            s = _score(
                w_ptr, s_ptr, x_ptr, nrow_ptr, ncol_ptr, nscal_ptr, row, offs, valid,
                stride_w, stride_s, SOURCE, TRANSFORM, NORM, HAS_X, CLAMP,
            )  # fmt: skip
            n_below += tl.sum((_keys(s, valid) < t).to(tl.int32), axis=0)
        need = k - n_below
        seen = tl.full([], 0, tl.int32)  # ties of t in earlier chunks
        for c0 in range(0, n_cols, BLOCK):
            offs = c0 + tl.arange(0, BLOCK)
            valid = offs < n_cols
            s = _score(
                w_ptr, s_ptr, x_ptr, nrow_ptr, ncol_ptr, nscal_ptr, row, offs, valid,
                stride_w, stride_s, SOURCE, TRANSFORM, NORM, HAS_X, CLAMP,
            )  # fmt: skip
            key = _keys(s, valid)
            tied = (key == t) & valid
            rank = seen + tl.cumsum(tied.to(tl.int32), axis=0)
            prune = ((key < t) | (tied & (rank <= need))) & valid
            seen += tl.sum(tied.to(tl.int32), axis=0)
            if WRITE_W:  # noqa: SIM102 (compile-time flag, then a runtime condition)
                if n_nan == 0:
                    tl.store(w_ptr + row * stride_w + offs, 0.0, mask=prune)
            if WRITE_KEEP:
                tl.store(keep_ptr + row * stride_k + offs, prune == 0, mask=valid)
    tl.atomic_add(nan_ptr, n_nan, mask=n_nan > 0)


@triton.jit
def _nm_kernel(
    w_ptr,
    s_ptr,
    keep_ptr,
    nan_ptr,
    x_ptr,
    nrow_ptr,
    ncol_ptr,
    nscal_ptr,
    n_groups,
    n_prune,
    stride_w,
    stride_s,
    stride_k,
    SOURCE: tl.constexpr,
    TRANSFORM: tl.constexpr,
    NORM: tl.constexpr,
    HAS_X: tl.constexpr,
    CLAMP: tl.constexpr,
    WRITE_W: tl.constexpr,
    WRITE_KEEP: tl.constexpr,
    M: tl.constexpr,
    M_POW2: tl.constexpr,
    BLOCK_G: tl.constexpr,
):
    """Program (row, block of groups): in each group of M, prune the n_prune lowest scores."""
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    m = tl.arange(0, M_POW2)
    cols = g[:, None] * M + m[None, :]
    valid = (g[:, None] < n_groups) & (m[None, :] < M)
    s = _score(
        w_ptr, s_ptr, x_ptr, nrow_ptr, ncol_ptr, nscal_ptr, row, cols, valid,
        stride_w, stride_s, SOURCE, TRANSFORM, NORM, HAS_X, CLAMP,
    )  # fmt: skip
    # Rank of each weight in its group under a stable ascending order: the group members that
    # are smaller, or equal and to its left. Float comparisons, like torch.sort (-0.0 == 0.0).
    a = s[:, :, None]
    b = s[:, None, :]
    ia = m[None, :, None]
    ib = m[None, None, :]
    before = ((b < a) | ((b == a) & (ib < ia))) & (ib < M)
    rank = tl.sum(before.to(tl.int32), axis=2)
    prune = (rank < n_prune) & valid
    nan_in_group = tl.sum(((s != s) & valid).to(tl.int32), axis=1)
    if WRITE_W:
        # Groups with a NaN score are left as they are; the rest is written whole (vector
        # stores, the reload is an L1 hit) rather than as scattered 2-byte zeros.
        zero = prune & (nan_in_group[:, None] == 0)
        w_tile = (w_ptr + cols) + row * stride_w
        w = tl.load(w_tile, mask=valid)
        tl.store(w_tile, tl.where(zero, tl.zeros_like(w), w), mask=valid)
    if WRITE_KEEP:
        tl.store((keep_ptr + cols) + row * stride_k, prune == 0, mask=valid)
    n_nan = tl.sum(nan_in_group, axis=0)
    tl.atomic_add(nan_ptr, n_nan, mask=n_nan > 0)


@triton.jit
def _nm4_kernel(
    w_ptr,
    s_ptr,
    keep_ptr,
    nan_ptr,
    x_ptr,
    nrow_ptr,
    ncol_ptr,
    nscal_ptr,
    n_cols,
    n_prune,
    stride_w,
    stride_s,
    stride_k,
    SOURCE: tl.constexpr,
    TRANSFORM: tl.constexpr,
    NORM: tl.constexpr,
    HAS_X: tl.constexpr,
    CLAMP: tl.constexpr,
    WRITE_W: tl.constexpr,
    WRITE_KEEP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """N:4, program (row, BLOCK columns): in each group of 4, prune the n_prune lowest scores.

    ``n_cols`` is the number of columns in whole groups (a multiple of 4). The contiguous
    tile of scores is reshaped to ``[BLOCK // 4, 2, 2]`` and split twice into the groups'
    members ``s0..s3`` (columns ``4g + 0..3``, each a ``[BLOCK // 4]`` vector); each member's
    rank is counted with explicit comparisons, the same as :func:`_nm_kernel`'s, and the
    ranks are joined back into the tile's order for contiguous stores.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = cols < n_cols
    s = _score(
        w_ptr, s_ptr, x_ptr, nrow_ptr, ncol_ptr, nscal_ptr, row, cols, valid,
        stride_w, stride_s, SOURCE, TRANSFORM, NORM, HAS_X, CLAMP,
    )  # fmt: skip
    n_nan = tl.sum(((s != s) & valid).to(tl.int32), axis=0)
    # [BLOCK] -> [G, 2, 2] (column 4g + 2a + b at [g, a, b]); split b, then a.
    even, odd = tl.split(tl.reshape(s, [BLOCK // 4, 2, 2]))
    s0, s2 = tl.split(even)
    s1, s3 = tl.split(odd)
    # Stable ascending order, float comparisons like _nm_kernel's (and torch.sort: -0.0 ==
    # 0.0): a member to the left counts if <= (equal and left), one to the right if <; every
    # comparison with a NaN is false, as there.
    r0 = (s1 < s0).to(tl.int32) + (s2 < s0).to(tl.int32) + (s3 < s0).to(tl.int32)
    r1 = (s0 <= s1).to(tl.int32) + (s2 < s1).to(tl.int32) + (s3 < s1).to(tl.int32)
    r2 = (s0 <= s2).to(tl.int32) + (s1 <= s2).to(tl.int32) + (s3 < s2).to(tl.int32)
    r3 = (s0 <= s3).to(tl.int32) + (s1 <= s3).to(tl.int32) + (s2 <= s3).to(tl.int32)
    # A group with a NaN score adds 4 to its ranks: the keep mask reads rank & 3, the weight
    # write rank < n_prune (n_prune <= 3), so those groups keep their weights.
    nan4 = ((s0 != s0) | (s1 != s1) | (s2 != s2) | (s3 != s3)).to(tl.int32) * 4
    code = tl.join(tl.join(r0 + nan4, r2 + nan4), tl.join(r1 + nan4, r3 + nan4))
    code = tl.reshape(code, [BLOCK])
    inb = n_cols > cols
    if WRITE_W:
        # The whole tile is written (vector stores; the reload is an L1 hit).
        w_tile = (w_ptr + cols) + row * stride_w
        w = tl.load(w_tile, mask=inb)
        tl.store(w_tile, tl.where(code < n_prune, tl.zeros_like(w), w), mask=inb)
    if WRITE_KEEP:
        tl.store((keep_ptr + cols) + row * stride_k, (code & 3) >= n_prune, mask=inb)
    tl.atomic_add(nan_ptr, n_nan, mask=n_nan > 0)


#: Whether the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 at import time).
INTERPRETED = isinstance(_row_kernel, InterpretedFunction)


def _pointers(weight, scores, keep, spec_tensors):
    """Arguments for the pointer slots; unused slots get the weight (never dereferenced)."""
    x, nrow, ncol, nscal = spec_tensors
    dummy = weight
    return (
        weight,
        dummy if scores is None else scores,
        dummy if keep is None else keep,
        dummy if x is None else x,
        dummy if nrow is None else nrow,
        dummy if ncol is None else ncol,
        dummy if nscal is None else nscal,
    )


def launch_rows(
    weight: torch.Tensor,
    scores: torch.Tensor | None,
    keep: torch.Tensor | None,
    nan_count: torch.Tensor,
    spec_tensors: tuple,
    consts: dict,
    k: int,
    write_weight: bool,
    max_resident: int = MAX_RESIDENT,
    num_warps: int | None = None,
    small: int | None = None,
    coarse_bits: int | None = None,
    select: str | None = None,
    fused_reduce: bool | None = None,
) -> None:
    """Launch the row kernel (one program per output row); see :func:`fused.triton_prune`.

    ``select`` picks the k-th-key search of rows held in registers (longer rows are always
    streamed and bisected): ``"two_level"`` bisects over the whole row only until
    the candidate bucket holds at most ``small`` keys, then over that bucket (see
    :func:`_select_two_level`); ``"bisect"`` (default) is the earlier search: ``coarse_bits``
    (1..32) counted over the whole row, then a bucket of at most ``small`` keys (copied with a
    prefix sum) for the remaining bits; 32 bisects over the whole row throughout; ``"snap"``
    bisects the key range with a bracket snapped onto actual keys (:func:`_select_snap`; no
    scratch, ``small`` and ``coarse_bits`` unused); its per-pass count, maximum and minimum
    are one tuple reduction with ``fused_reduce`` (default: compiled), three reductions
    without (default in Triton's interpreter, where a tuple reduction is a Python loop over
    the elements). ``num_warps`` may be any power of two Triton accepts (1 and 2 included:
    more keys a thread, fewer warps to combine).
    Defaults (see :func:`default_row_knobs`): 32 keys a thread (4 warps up to 4096-long rows,
    16 for 16384), ``small`` two keys a thread (two-level) or an eighth of the row (bisect),
    ``coarse_bits`` 32.
    """
    rows, cols = weight.shape
    w, s, kp, x, nrow, ncol, nscal = _pointers(weight, scores, keep, spec_tensors)
    resident = triton.next_power_of_2(cols) <= max_resident
    block = triton.next_power_of_2(cols) if resident else min(4096, max_resident)
    knobs = default_row_knobs(cols, max_resident)
    select = select or knobs["select"]
    if select not in SELECTS:
        raise ValueError(f"select must be one of {SELECTS}, got {select!r}.")
    two_level = resident and select == "two_level"
    select_code = SELECTS.index(select) if resident else 0
    fused_reduce = (not INTERPRETED) if fused_reduce is None else bool(fused_reduce)
    num_warps = num_warps or knobs["num_warps"]
    if coarse_bits is None:
        coarse_bits = knobs["coarse_bits"]
    if small is None:
        # Two-level: two keys a thread in phase 2. Bisect: an eighth of the row, several times
        # the usual bucket after 12 bits.
        small = max(16, 2 * 32 * num_warps) if two_level else max(16, block // 8)
    if two_level:
        small = min(small, block // 2)  # phase 1 needs SMALL < BLOCK (a power of two)
    scratch_rows = (
        rows if resident and (two_level or (select == "bisect" and coarse_bits < 32)) else 1
    )
    scratch = torch.empty((scratch_rows, small), dtype=torch.int32, device=w.device)
    counter = torch.empty((rows if two_level else 1,), dtype=torch.int32, device=w.device)
    _row_kernel[(rows,)](
        w, s, kp, nan_count, scratch, counter, x, nrow, ncol, nscal,
        cols, k, weight.stride(0), 0 if scores is None else scores.stride(0),
        0 if keep is None else keep.stride(0),
        WRITE_W=write_weight, WRITE_KEEP=keep is not None, RESIDENT=resident, BLOCK=block,
        SMALL=small, COARSE_BITS=coarse_bits, SELECT=select_code,
        LOG_BLOCK=block.bit_length() - 1, FUSED_REDUCE=fused_reduce,
        num_warps=num_warps, enable_fp_fusion=False, **consts,
    )  # fmt: skip


def default_row_knobs(cols: int, max_resident: int = MAX_RESIDENT) -> dict:
    """The row kernel's default launch knobs for rows of ``cols`` weights.

    The bisection with ``coarse_bits=32`` (no bucket copy) and 32 keys a thread
    (``next_power_of_2(cols) // 1024`` warps, 4 to 16): the fastest in the H200 sweep
    (benchmarks/results/kernels_h200.md: 4 warps on 4096-long rows, 16 on 14336-long ones,
    1.3-1.6x the earlier heuristics). The two-level search runs ~60% fewer counting
    instructions but, compiled by Triton 3.6 for sm_90, needs more registers (140 vs 118 a
    thread at 4096/4 warps, 117 vs 64 at 16384/16) and a chain of warp-aggregated global
    atomics for the bucket copy; it stays opt-in until the GPU sweep
    (benchmarks/bench_kernels.py) shows it faster.
    """
    block = triton.next_power_of_2(cols)
    if block > max_resident:
        block = min(4096, max_resident)
    return {"select": "bisect", "num_warps": max(4, min(16, block // 1024)), "coarse_bits": 32}


def launch_nm(
    weight: torch.Tensor,
    scores: torch.Tensor | None,
    keep: torch.Tensor | None,
    nan_count: torch.Tensor,
    spec_tensors: tuple,
    consts: dict,
    n: int,
    m: int,
    write_weight: bool,
    num_warps: int | None = None,
    nm_impl: str | None = None,
    block: int | None = None,
) -> None:
    """Launch the N:M kernel (programs over rows x blocks of groups).

    ``nm_impl`` (see :data:`NM_IMPLS`): ``"pairwise"`` (any ``M``; the default unless
    ``M = 4``) or ``"split4"`` (``M = 4`` only, the default there, :func:`_nm4_kernel`), which
    takes ``block`` columns a program (a power of two >= 4, default :data:`NM4_BLOCK`; capped
    at the row's length rounded up to a power of two) and ``num_warps`` (default
    :data:`NM4_WARPS`). ``block`` is unused by ``"pairwise"``.
    """
    rows, cols = weight.shape
    groups = cols // m
    w, s, kp, x, nrow, ncol, nscal = _pointers(weight, scores, keep, spec_tensors)
    nm_impl = nm_impl or ("split4" if m == 4 else "pairwise")
    if nm_impl not in NM_IMPLS:
        raise ValueError(f"nm_impl must be one of {NM_IMPLS}, got {nm_impl!r}.")
    if nm_impl == "split4":
        if m != 4:
            raise ValueError(f"nm_impl='split4' needs M = 4, got {n}:{m}.")
        block = block or NM4_BLOCK
        if block < 4 or block & (block - 1):
            raise ValueError(f"block must be a power of two >= 4, got {block}.")
        block = min(block, max(4, triton.next_power_of_2(groups * 4)))
        _nm4_kernel[(rows, triton.cdiv(groups * 4, block))](
            w, s, kp, nan_count, x, nrow, ncol, nscal,
            groups * 4, m - n, weight.stride(0), 0 if scores is None else scores.stride(0),
            0 if keep is None else keep.stride(0),
            WRITE_W=write_weight, WRITE_KEEP=keep is not None, BLOCK=block,
            num_warps=num_warps or NM4_WARPS, enable_fp_fusion=False, **consts,
        )  # fmt: skip
        return
    m_pow2 = triton.next_power_of_2(m)
    # 1024 weights a program; the pairwise comparison tile is BLOCK_G x M x M.
    block_g = min(triton.next_power_of_2(groups), max(1, 1024 // m_pow2))
    _nm_kernel[(rows, triton.cdiv(groups, block_g))](
        w, s, kp, nan_count, x, nrow, ncol, nscal,
        groups, m - n, weight.stride(0), 0 if scores is None else scores.stride(0),
        0 if keep is None else keep.stride(0),
        WRITE_W=write_weight, WRITE_KEEP=keep is not None, M=m, M_POW2=m_pow2, BLOCK_G=block_g,
        num_warps=num_warps or (4 if m_pow2 <= 4 else 8), enable_fp_fusion=False, **consts,
    )  # fmt: skip
