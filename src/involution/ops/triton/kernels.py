"""Triton kernels of the involution op (Li et al., CVPR 2021, arXiv 2103.06255, Eq. 4).

Every kernel is written for three spatial dimensions; 1D and 2D problems reach them through an
exact reshape that gives the missing dimensions size 1 and kernel size 1 (see ``launch.py``).
Tensors are contiguous and viewed per (batch, group) row ``n`` in ``[0, NR)``, ``NR = B * G``::

    x   (NR, CG, D, H, W)          input, CG = C // G channels per group
    w   (NR, T, OD, OH, OW)        per-pixel kernel, T = KD * KH * KW taps in row-major order
    y   (NR, CG, OD, OH, OW)       output

Work split. A program takes BLOCK_P lanes of the flattened (row ``n``, pixel) index space, so
small images still fill whole programs. Each lane owns ROWS vertically adjacent pixels of one
column (a "strip") and the BLOCK_C channels of a chunk of its group, in registers; consecutive
lanes hold consecutive columns, so every load is coalesced. Taps and strip rows are compile-time
loops; accumulation is in float32.

Register reuse. A strip's ROWS output pixels read overlapping input rows: for one column offset
``kw``, output row ``r`` and tap row ``kh`` read input row ``r * SH + kh * DH`` of the strip's
window. Each distinct input row is loaded once and used for every (r, kh) pair that reads it, so a
strip of ROWS rows with a 7x7 kernel loads ROWS + 6 input rows per column offset instead of
ROWS * 7. ROWS = 1 is the plain one-pixel-per-lane kernel; the autotuner chooses.

No program writes where another one does, so there are no atomics and results are
deterministic: the input gradient is a gather over taps (each input pixel collects from the
output pixels that read it), the kernel gradient sums over the group's channels inside the lane.

The channel count per group ``CG`` is a compile-time constant, like the geometry: a network
compiles one variant per group width (RedNet: 16), and the channel loops get a known trip count.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Sizes are not specialized on divisibility by 16: the input is gathered at shifted, unaligned
# positions that cannot be vectorized, and were the aligned accesses (kernel, output) vectorized,
# their register layout would differ from the gathers' and every tap would pay a layout conversion
# through shared memory. With every access scalar, all share one layout (measured on an H200:
# 6x faster forward than with the vectorized kernel loads).
_SIZES = ["NR", "D", "H", "W", "OD", "OH", "OW"]


@triton.jit
def _lanes(NR, Q, BLOCK_P: tl.constexpr):
    """Row index (int64) and position in the row of each lane; lanes past the last row have
    ``n >= NR``. The program's first row is found once in 64 bits; lanes step from it in 32."""
    start = tl.program_id(0).to(tl.int64) * BLOCK_P
    first = start // Q
    local = (start - first * Q).to(tl.int32) + tl.arange(0, BLOCK_P)
    return first + local // Q, local % Q


@triton.jit
def _strips(q, OH, OW, ROWS: tl.constexpr):
    """Position in a row -> (depth, first row, column) of the lane's strip of ROWS rows."""
    col = q % OW
    rest = q // OW
    strips = tl.cdiv(OH, ROWS)
    return rest // strips, (rest % strips) * ROWS, col


@triton.jit
def _add_at(values, index: tl.constexpr, addend):
    """``values`` with ``addend`` added to entry ``index`` (tuples are immutable in Triton)."""
    # Triton's frontend concatenates tuples but does not unpack them into a new one.
    return values[:index] + (values[index] + addend,) + values[index + 1 :]  # noqa: RUF005


@triton.jit
def _zeros(count: tl.constexpr, shape: tl.constexpr):
    values = ()
    for _ in tl.static_range(count):
        values = values + (tl.zeros(shape, dtype=tl.float32),)  # type: ignore[assignment]  # noqa: RUF005
    return values


@triton.jit
def _strip_pixel(od, oh0, ow, r: tl.constexpr, OH, OW, in_n):
    """Flattened output pixel of row ``r`` of each lane's strip, and whether it exists."""
    return (od * OH + oh0 + r) * OW + ow, in_n & (oh0 + r < OH)


@triton.jit
def _load_strip(row, c, CG: tl.constexpr, OD, OH, OW, od, oh0, ow, in_n, ROWS: tl.constexpr):
    """The (lane, channel) tiles of a row-contiguous (channel, pixel) tensor at the ROWS pixels
    of each lane's strip, as float32."""
    P = OD * OH * OW
    tiles = ()
    for r in tl.static_range(ROWS):
        pix, valid = _strip_pixel(od, oh0, ow, r, OH, OW, in_n)
        mask = valid[:, None] & (c < CG)[None, :]
        tile = tl.load(row[:, None] + c[None, :] * P + pix[:, None], mask=mask, other=0.0)
        tiles = tiles + (tile.to(tl.float32),)  # type: ignore[assignment]  # noqa: RUF005
    return tiles


@triton.jit(do_not_specialize=_SIZES)
def involution_forward_kernel(
    x_ptr,  # (NR, CG, D, H, W)
    w_ptr,  # (NR, T, OD, OH, OW)
    y_ptr,  # (NR, CG, OD, OH, OW)
    NR,
    CG: tl.constexpr,
    D,
    H,
    W,
    OD,
    OH,
    OW,
    KD: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    SD: tl.constexpr,
    SH: tl.constexpr,
    SW: tl.constexpr,
    PD: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    DD: tl.constexpr,
    DH: tl.constexpr,
    DW: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
    ROWS: tl.constexpr,
):
    P = OD * OH * OW
    n, q = _lanes(NR, OD * tl.cdiv(OH, ROWS) * OW, BLOCK_P)
    in_n = n < NR
    od, oh0, ow = _strips(q, OH, OW, ROWS)
    x_row = x_ptr + n * (CG * D * H * W)
    w_row = w_ptr + n * (KD * KH * KW * P)
    y_row = y_ptr + n * (CG * P)
    # Input rows of the strip's window: output row r, tap row kh -> window row r * SH + kh * DH.
    SPAN: tl.constexpr = (ROWS - 1) * SH + (KH - 1) * DH + 1
    for c0 in range(0, CG, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        in_c = c < CG
        x_chan = x_row[:, None] + c[None, :] * (D * H * W)
        acc = _zeros(ROWS, (BLOCK_P, BLOCK_C))
        for kd in tl.static_range(KD):
            i_d = od * SD - PD + kd * DD
            ok_d = in_n & (i_d >= 0) & (i_d < D)
            for kw in tl.static_range(KW):
                i_w = ow * SW - PW + kw * DW
                ok_w = ok_d & (i_w >= 0) & (i_w < W)
                for j in tl.static_range(SPAN):
                    i_h = oh0 * SH - PH + j
                    ok = ok_w & (i_h >= 0) & (i_h < H)
                    offset = (i_d * H + i_h) * W + i_w
                    xv = tl.load(
                        x_chan + offset[:, None], mask=ok[:, None] & in_c[None, :], other=0.0
                    ).to(tl.float32)
                    for r in tl.static_range(ROWS):
                        for kh in tl.static_range(KH):
                            if r * SH + kh * DH == j:
                                tap = (kd * KH + kh) * KW + kw
                                pix, valid = _strip_pixel(od, oh0, ow, r, OH, OW, in_n)
                                wv = tl.load(w_row + tap * P + pix, mask=valid, other=0.0).to(
                                    tl.float32
                                )
                                acc = _add_at(acc, r, xv * wv[:, None])
        for r in tl.static_range(ROWS):
            pix, valid = _strip_pixel(od, oh0, ow, r, OH, OW, in_n)
            tl.store(
                y_row[:, None] + c[None, :] * P + pix[:, None],
                acc[r].to(y_ptr.dtype.element_ty),
                mask=valid[:, None] & in_c[None, :],
            )


@triton.jit(do_not_specialize=_SIZES)
def involution_grad_input_kernel(
    gy_ptr,  # (NR, CG, OD, OH, OW)
    w_ptr,  # (NR, T, OD, OH, OW)
    gx_ptr,  # (NR, CG, D, H, W)
    NR,
    CG: tl.constexpr,
    D,
    H,
    W,
    OD,
    OH,
    OW,
    KD: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    SD: tl.constexpr,
    SH: tl.constexpr,
    SW: tl.constexpr,
    PD: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    DD: tl.constexpr,
    DH: tl.constexpr,
    DW: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
    ROWS: tl.constexpr,
):
    # Output pixel o reads input pixel i = o * S - PAD + k * DIL, so tap k reaches i from
    # o = (i + PAD - k * DIL) / S when that divides exactly. Lanes index the input on the
    # quotient grid i = res + q * S, and the program walks the S residues `res` per dimension
    # at compile time: which taps reach a residue, and at which output offset
    # e = (res + PAD - k * DIL) / S, is then known when the kernel compiles.
    QD = tl.cdiv(D, SD)
    QH = tl.cdiv(H, SH)
    QW = tl.cdiv(W, SW)
    P = OD * OH * OW
    n, q = _lanes(NR, QD * tl.cdiv(QH, ROWS) * QW, BLOCK_P)
    in_n = n < NR
    q_d, q_h0, q_w = _strips(q, QH, QW, ROWS)
    gy_row = gy_ptr + n * (CG * P)
    w_row = w_ptr + n * (KD * KH * KW * P)
    gx_row = gx_ptr + n * (CG * D * H * W)
    # Output rows of the strip: input row r and tap row kh (of residue res_h) read output row
    # q_h0 + r + e_h(kh), with e_h from LO_H (last tap) to HI_H (first tap).
    LO_H: tl.constexpr = -((KH - 1) * DH // SH) - 1
    HI_H: tl.constexpr = (SH - 1 + PH) // SH
    residue = tl.program_id(1)
    for res_d in tl.static_range(SD):
        for res_h in tl.static_range(SH):
            for res_w in tl.static_range(SW):
                if residue == (res_d * SH + res_h) * SW + res_w:
                    i_d = res_d + q_d * SD
                    i_w = res_w + q_w * SW
                    for c0 in range(0, CG, BLOCK_C):
                        c = c0 + tl.arange(0, BLOCK_C)
                        in_c = c < CG
                        gy_chan = gy_row[:, None] + c[None, :] * P
                        acc = _zeros(ROWS, (BLOCK_P, BLOCK_C))
                        for kd in tl.static_range(KD):
                            if (res_d + PD - kd * DD) % SD == 0:
                                o_d = q_d + (res_d + PD - kd * DD) // SD
                                ok_d = in_n & (o_d >= 0) & (o_d < OD)
                                for kw in tl.static_range(KW):
                                    if (res_w + PW - kw * DW) % SW == 0:
                                        o_w = q_w + (res_w + PW - kw * DW) // SW
                                        ok_w = ok_d & (o_w >= 0) & (o_w < OW)
                                        for j in tl.static_range(LO_H, ROWS + HI_H):
                                            o_h = q_h0 + j
                                            ok = ok_w & (o_h >= 0) & (o_h < OH)
                                            o = (o_d * OH + o_h) * OW + o_w
                                            gv = tl.load(
                                                gy_chan + o[:, None],
                                                mask=ok[:, None] & in_c[None, :],
                                                other=0.0,
                                            ).to(tl.float32)
                                            for r in tl.static_range(ROWS):
                                                for kh in tl.static_range(KH):
                                                    # Tap row kh takes input row r from
                                                    # output row j: r*S = j*S - (res+PAD-kh*DIL).
                                                    if r * SH + res_h + PH - kh * DH == j * SH:
                                                        tap = (kd * KH + kh) * KW + kw
                                                        wv = tl.load(
                                                            w_row + tap * P + o, mask=ok, other=0.0
                                                        ).to(tl.float32)
                                                        acc = _add_at(acc, r, gv * wv[:, None])
                        for r in tl.static_range(ROWS):
                            i_h = res_h + (q_h0 + r) * SH
                            i = (i_d * H + i_h) * W + i_w
                            inside = in_n & (i_d < D) & (i_h < H) & (i_w < W) & (q_h0 + r < QH)
                            tl.store(
                                gx_row[:, None] + c[None, :] * (D * H * W) + i[:, None],
                                acc[r].to(gx_ptr.dtype.element_ty),
                                mask=inside[:, None] & in_c[None, :],
                            )


@triton.jit(do_not_specialize=_SIZES)
def involution_grad_kernel_kernel(
    gy_ptr,  # (NR, CG, OD, OH, OW)
    x_ptr,  # (NR, CG, D, H, W)
    gw_ptr,  # (NR, T, OD, OH, OW)
    NR,
    CG: tl.constexpr,
    D,
    H,
    W,
    OD,
    OH,
    OW,
    KD: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    SD: tl.constexpr,
    SH: tl.constexpr,
    SW: tl.constexpr,
    PD: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    DD: tl.constexpr,
    DH: tl.constexpr,
    DW: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
    ROWS: tl.constexpr,
):
    P = OD * OH * OW
    n, q = _lanes(NR, OD * tl.cdiv(OH, ROWS) * OW, BLOCK_P)
    in_n = n < NR
    od, oh0, ow = _strips(q, OH, OW, ROWS)
    x_row = x_ptr + n * (CG * D * H * W)
    gy_row = gy_ptr + n * (CG * P)
    gw_row = gw_ptr + n * (KD * KH * KW * P)
    SPAN: tl.constexpr = (ROWS - 1) * SH + (KH - 1) * DH + 1
    # When one chunk holds the group, grad_out stays in registers across all taps.
    RESIDENT: tl.constexpr = CG <= BLOCK_C
    if RESIDENT:
        gy_group = _load_strip(
            gy_row, tl.arange(0, BLOCK_C), CG, OD, OH, OW, od, oh0, ow, in_n, ROWS
        )
    for kd in tl.static_range(KD):
        i_d = od * SD - PD + kd * DD
        ok_d = in_n & (i_d >= 0) & (i_d < D)
        for kw in tl.static_range(KW):
            i_w = ow * SW - PW + kw * DW
            ok_w = ok_d & (i_w >= 0) & (i_w < W)
            # One sum per (strip row r, tap row kh), index r * KH + kh, over the group's channels.
            acc = _zeros(ROWS * KH, (BLOCK_P,))
            for c0 in range(0, CG, BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C)
                in_c = c < CG
                if RESIDENT:
                    gy = gy_group
                else:
                    gy = _load_strip(gy_row, c, CG, OD, OH, OW, od, oh0, ow, in_n, ROWS)
                for j in tl.static_range(SPAN):
                    i_h = oh0 * SH - PH + j
                    ok = ok_w & (i_h >= 0) & (i_h < H)
                    offset = (i_d * H + i_h) * W + i_w
                    xv = tl.load(
                        x_row[:, None] + c[None, :] * (D * H * W) + offset[:, None],
                        mask=ok[:, None] & in_c[None, :],
                        other=0.0,
                    ).to(tl.float32)
                    for r in tl.static_range(ROWS):
                        for kh in tl.static_range(KH):
                            if r * SH + kh * DH == j:
                                total = tl.sum(gy[r] * xv, axis=1)
                                acc = _add_at(acc, r * KH + kh, total)
            for r in tl.static_range(ROWS):
                pix, valid = _strip_pixel(od, oh0, ow, r, OH, OW, in_n)
                for kh in tl.static_range(KH):
                    tap = (kd * KH + kh) * KW + kw
                    tl.store(
                        gw_row + tap * P + pix,
                        acc[r * KH + kh].to(gw_ptr.dtype.element_ty),
                        mask=valid,
                    )
