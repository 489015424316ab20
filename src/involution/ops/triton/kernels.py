"""Triton kernels of the involution op (Li et al., CVPR 2021, arXiv 2103.06255, Eq. 4).

Every kernel is written for three spatial dimensions; 1D and 2D problems reach them through an
exact reshape that gives the missing dimensions size 1 and kernel size 1 (see ``launch.py``).
Tensors are read and written where they lie, through their strides (in elements)::

    x   (B, C, D, H, W)            input, C = G * CG: G groups of CG channels
    w   (B, G, T, OD, OH, OW)      per-pixel kernel, T = KD * KH * KW taps in row-major order
    y   (B, C, OD, OH, OW)         output

Lanes. A program takes BLOCK_P lanes of one batch element; a lane is one group of one strip of
ROWS vertically adjacent output pixels (or input pixels, for the input gradient) and holds the
group's channels in registers, BLOCK_C at a time. Accumulation is in float32.

Layouts. ``CL`` says that every channel tensor (x, y and their gradients) has unit channel
stride (channels_last). The lanes of a program then run over the groups of a pixel first, so
that consecutive lanes read consecutive memory, and the row strides of the channel tensors are
passed in units of ``ALIGN`` elements: the compiler sees each (lane, channel) tile contiguous
and aligned along its channels and loads and stores it with 16-byte vectors, a few threads per
lane holding one vector each. Otherwise (NCHW, or anything strided) the lanes run over the
pixels of a group first, so that consecutive lanes read consecutive columns, and each thread
holds its lane's BLOCK_C channels, read one by one (``ALIGN`` is 1).

``TAPS_INNER`` says that the kernel tensor has unit tap stride: the pixel-major view of a
channels_last span convolution's output. The forward pass and the kernel gradient load (store)
the KW taps of one kernel row of a lane as one (lane, tap) tile, which Triton moves between
thread layouts through shared memory, so that a warp's accesses cover neighbouring taps instead
of one tap of many lanes, each in its own cache line. The input gradient reads taps of
different output pixels for each input pixel, one at a time.

Register reuse. A strip's ROWS output pixels read overlapping input rows: output row ``r`` and
tap row ``kh`` read input row ``r * SH + kh * DH`` of the strip's window. Each distinct input
row is loaded once and used for every (r, kh) pair that reads it, so a strip of ROWS rows with a
7x7 kernel loads ROWS + 6 input rows per column offset instead of ROWS * 7.

No program writes where another one does, so there are no atomics and results are
deterministic: the input gradient is a gather over taps (each input pixel collects from the
output pixels that read it), the kernel gradient sums over the group's channels inside the lane.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Sizes and strides are not specialized on their values: what the compiler may assume about
# them (unit channel or tap stride, alignment of the channel rows) is passed as constexprs
# chosen by the launcher, so that one compiled variant serves every image size of a layer.
_RUNTIME = [
    *("G", "D", "H", "W", "OD", "OH", "OW", "NBLK"),
    *(f"{tensor}_{axis}" for tensor in ("sx", "sy", "sgx", "sgy") for axis in "bcdhw"),
    *(f"{tensor}_{axis}" for tensor in ("sw", "sgw") for axis in "bgtdhw"),
]


@triton.jit
def _lanes(G, Q, NBLK, BLOCK_P: tl.constexpr, CL: tl.constexpr):
    """The program's batch index (int64), and each lane's group, position in the group's grid
    of ``Q`` strips and whether it exists. Programs are numbered batch-major, NBLK per batch."""
    pid = tl.program_id(0)
    b = pid // NBLK
    lane = (pid - b * NBLK) * BLOCK_P + tl.arange(0, BLOCK_P)
    if CL:
        g = lane % G
        q = lane // G
    else:
        q = lane % Q
        g = lane // Q
    return b.to(tl.int64), g, q, lane < G * Q


@triton.jit
def _strips(q, OH, OW, ROWS: tl.constexpr):
    """Position in a group's grid -> (depth, first row, column) of the lane's strip."""
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
def _channels(ptr, row, stride, c0, BLOCK_C: tl.constexpr, ALIGN: tl.constexpr):
    """Pointers (lane, channel) to channels ``c0 + [0, BLOCK_C)`` of each lane's row at ``row``
    (in units of ALIGN elements: the multiplication tells the compiler rows are aligned)."""
    return ptr + (row * ALIGN)[:, None] + (c0 + tl.arange(0, BLOCK_C))[None, :] * stride


@triton.jit
def _at(channels, pixel, ALIGN: tl.constexpr):
    """``channels`` pointers moved to each lane's ``pixel`` offset (in units of ALIGN)."""
    return channels + (pixel * ALIGN)[:, None]


@triton.jit
def _channel_mask(ok, c0, CG: tl.constexpr, BLOCK_C: tl.constexpr):
    """(lane, channel) mask: lane ``ok`` and channel inside the group. Lane-only when the chunk
    always fills the group, which keeps the mask uniform along the vectorized channel axis."""
    mask = tl.broadcast_to(ok[:, None], (ok.shape[0], BLOCK_C))
    if BLOCK_C != CG:
        mask = mask & ((c0 + tl.arange(0, BLOCK_C)) < CG)[None, :]
    return mask


@triton.jit
def _load_strip(
    channels,
    stride_h,
    row0,
    OH,
    in_lane,
    c0,
    CG: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ALIGN: tl.constexpr,
    ROWS: tl.constexpr,
):
    """The (lane, channel) tiles, as float32, of rows ``row0 .. row0 + ROWS - 1``."""
    tiles = ()
    for r in tl.static_range(ROWS):
        mask = _channel_mask(in_lane & (row0 + r < OH), c0, CG, BLOCK_C)
        tile = tl.load(_at(channels, (row0 + r) * stride_h, ALIGN), mask=mask, other=0.0)
        tiles = tiles + (tile.to(tl.float32),)  # type: ignore[assignment]  # noqa: RUF005
    return tiles


@triton.jit
def _columns(tile, WIDTH: tl.constexpr, BLOCK_P: tl.constexpr):
    """The WIDTH (a power of two) columns of a (BLOCK_P, WIDTH) tile, in order, as a tuple."""
    parts = (tile,)
    for _ in tl.static_range(8):
        if parts[0].shape[1] > 1:
            halves = ()
            for i in tl.static_range(len(parts)):
                part = tl.reshape(parts[i], (BLOCK_P, 2, parts[i].shape[1] // 2))
                pair = tl.permute(part, (0, 2, 1))
                low, high = tl.split(pair)
                halves = halves + (low, high)  # type: ignore[assignment]  # noqa: RUF005
            parts = halves  # type: ignore[assignment]
    columns = ()
    for i in tl.static_range(WIDTH):
        columns = columns + (tl.reshape(parts[i], (BLOCK_P,)),)  # type: ignore[assignment]  # noqa: RUF005
    return columns


@triton.jit
def _tile(columns, WIDTH: tl.constexpr, BLOCK_P: tl.constexpr):
    """The inverse of ``_columns``: WIDTH (BLOCK_P,) vectors -> one (BLOCK_P, WIDTH) tile."""
    parts = (tl.reshape(columns[0], (BLOCK_P, 1)),)
    for i in tl.static_range(1, WIDTH):
        parts = parts + (tl.reshape(columns[i], (BLOCK_P, 1)),)  # type: ignore[assignment]  # noqa: RUF005
    for _ in tl.static_range(8):
        if len(parts) > 1:
            joined = ()
            for i in tl.static_range(len(parts) // 2):
                pair = tl.join(parts[2 * i], parts[2 * i + 1])  # (BLOCK_P, width, 2)
                merged = tl.reshape(tl.permute(pair, (0, 2, 1)), (BLOCK_P, 2 * pair.shape[1]))
                joined = joined + (merged,)  # noqa: RUF005
            parts = joined
    return parts[0]


@triton.jit
def _tap_row(ptr, w_pix, first, sw_t, valid, KW: tl.constexpr, BLOCK_P: tl.constexpr):
    """Taps ``first .. first + KW - 1`` of the kernel at ``ptr`` + per-lane offsets ``w_pix``,
    as a tuple of KW float32 (lane,) vectors: one tile load, contiguous along taps when
    ``sw_t`` is 1."""
    KWP: tl.constexpr = triton.next_power_of_2(KW)
    k = tl.arange(0, KWP)
    tile = tl.load(
        ptr + w_pix[:, None] + (first + k)[None, :] * sw_t,
        mask=valid[:, None] & (k < KW)[None, :],
        other=0.0,
    )
    return _columns(tile.to(tl.float32), KWP, BLOCK_P)


@triton.jit
def _store_tap_row(ptr, w_pix, first, sw_t, valid, values, KW: tl.constexpr, BLOCK_P: tl.constexpr):
    """Stores the KW (lane,) vectors ``values`` at taps ``first ..`` of each lane, as one tile."""
    KWP: tl.constexpr = triton.next_power_of_2(KW)
    k = tl.arange(0, KWP)
    padded = values
    for _ in tl.static_range(KWP - KW):
        padded = padded + (values[0],)  # noqa: RUF005
    tl.store(
        ptr + w_pix[:, None] + (first + k)[None, :] * sw_t,
        _tile(padded, KWP, BLOCK_P).to(ptr.dtype.element_ty),
        mask=valid[:, None] & (k < KW)[None, :],
    )


@triton.jit(do_not_specialize=_RUNTIME)
def involution_forward_kernel(
    x_ptr,  # (B, C, D, H, W)
    w_ptr,  # (B, G, T, OD, OH, OW)
    y_ptr,  # (B, C, OD, OH, OW)
    G,
    D,
    H,
    W,
    OD,
    OH,
    OW,
    NBLK,
    sx_b,
    sx_c,
    sx_d,
    sx_h,
    sx_w,
    sw_b,
    sw_g,
    sw_t,
    sw_d,
    sw_h,
    sw_w,
    sy_b,
    sy_c,
    sy_d,
    sy_h,
    sy_w,
    CG: tl.constexpr,
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
    CL: tl.constexpr,
    ALIGN: tl.constexpr,
    TAPS_INNER: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
    ROWS: tl.constexpr,
):
    b, g, q, in_lane = _lanes(G, OD * tl.cdiv(OH, ROWS) * OW, NBLK, BLOCK_P, CL)
    od, oh0, ow = _strips(q, OH, OW, ROWS)
    if CL:
        sx_c = 1
        sy_c = 1
    if TAPS_INNER:
        sw_t = 1
    x_ptr += b * sx_b * ALIGN
    w_ptr += b * sw_b
    y_ptr += b * sy_b * ALIGN
    x_lane = g * (CG // ALIGN * sx_c)
    w_lane = g * sw_g + od * sw_d + ow * sw_w
    y_lane = g * (CG // ALIGN * sy_c) + od * sy_d + ow * sy_w
    # Input rows of the strip's window: output row r, tap row kh -> window row r * SH + kh * DH.
    SPAN: tl.constexpr = (ROWS - 1) * SH + (KH - 1) * DH + 1
    for c0 in range(0, CG, BLOCK_C):
        x_chan = _channels(x_ptr, x_lane, sx_c, c0, BLOCK_C, ALIGN)
        acc = _zeros(ROWS, (BLOCK_P, BLOCK_C))
        for kd in tl.static_range(KD):
            i_d = od * SD - PD + kd * DD
            ok_d = in_lane & (i_d >= 0) & (i_d < D)
            for j in tl.static_range(SPAN):
                i_h = oh0 * SH - PH + j
                ok_h = ok_d & (i_h >= 0) & (i_h < H)
                # The kernel row each strip row r reads window row j with, if any.
                rows = ()
                for r in tl.static_range(ROWS):
                    row = 0
                    for kh in tl.static_range(KH):
                        if r * SH + kh * DH == j:
                            valid = in_lane & (oh0 + r < OH)
                            row = _tap_row(
                                w_ptr,
                                w_lane + (oh0 + r) * sw_h,
                                (kd * KH + kh) * KW,
                                sw_t,
                                valid,
                                KW,
                                BLOCK_P,
                            )
                    rows = rows + (row,)  # type: ignore[assignment]  # noqa: RUF005
                for kw in tl.static_range(KW):
                    i_w = ow * SW - PW + kw * DW
                    ok = ok_h & (i_w >= 0) & (i_w < W)
                    pixel = i_d * sx_d + i_h * sx_h + i_w * sx_w
                    xv = tl.load(
                        _at(x_chan, pixel, ALIGN),
                        mask=_channel_mask(ok, c0, CG, BLOCK_C),
                        other=0.0,
                    ).to(tl.float32)
                    for r in tl.static_range(ROWS):
                        for kh in tl.static_range(KH):
                            if r * SH + kh * DH == j:
                                acc = _add_at(acc, r, xv * rows[r][kw][:, None])
        y_chan = _channels(y_ptr, y_lane, sy_c, c0, BLOCK_C, ALIGN)
        for r in tl.static_range(ROWS):
            mask = _channel_mask(in_lane & (oh0 + r < OH), c0, CG, BLOCK_C)
            y_at = _at(y_chan, (oh0 + r) * sy_h, ALIGN)
            tl.store(y_at, acc[r].to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_RUNTIME)
def involution_grad_input_kernel(
    gy_ptr,  # (B, C, OD, OH, OW)
    w_ptr,  # (B, G, T, OD, OH, OW)
    gx_ptr,  # (B, C, D, H, W)
    G,
    D,
    H,
    W,
    OD,
    OH,
    OW,
    NBLK,
    sgy_b,
    sgy_c,
    sgy_d,
    sgy_h,
    sgy_w,
    sw_b,
    sw_g,
    sw_t,
    sw_d,
    sw_h,
    sw_w,
    sgx_b,
    sgx_c,
    sgx_d,
    sgx_h,
    sgx_w,
    CG: tl.constexpr,
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
    CL: tl.constexpr,
    ALIGN: tl.constexpr,
    TAPS_INNER: tl.constexpr,
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
    b, g, q, in_lane = _lanes(G, QD * tl.cdiv(QH, ROWS) * QW, NBLK, BLOCK_P, CL)
    q_d, q_h0, q_w = _strips(q, QH, QW, ROWS)
    if CL:
        sgy_c = 1
        sgx_c = 1
    if TAPS_INNER:
        sw_t = 1
    gy_ptr += b * sgy_b * ALIGN
    w_ptr += b * sw_b
    gx_ptr += b * sgx_b * ALIGN
    gy_lane = g * (CG // ALIGN * sgy_c)
    w_lane = g * sw_g
    gx_lane = g * (CG // ALIGN * sgx_c)
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
                        gy_chan = _channels(gy_ptr, gy_lane, sgy_c, c0, BLOCK_C, ALIGN)
                        acc = _zeros(ROWS, (BLOCK_P, BLOCK_C))
                        for kd in tl.static_range(KD):
                            if (res_d + PD - kd * DD) % SD == 0:
                                o_d = q_d + (res_d + PD - kd * DD) // SD
                                ok_d = in_lane & (o_d >= 0) & (o_d < OD)
                                for kw in tl.static_range(KW):
                                    if (res_w + PW - kw * DW) % SW == 0:
                                        o_w = q_w + (res_w + PW - kw * DW) // SW
                                        ok_w = ok_d & (o_w >= 0) & (o_w < OW)
                                        for j in tl.static_range(LO_H, ROWS + HI_H):
                                            o_h = q_h0 + j
                                            ok = ok_w & (o_h >= 0) & (o_h < OH)
                                            pixel = o_d * sgy_d + o_h * sgy_h + o_w * sgy_w
                                            gv = tl.load(
                                                _at(gy_chan, pixel, ALIGN),
                                                mask=_channel_mask(ok, c0, CG, BLOCK_C),
                                                other=0.0,
                                            ).to(tl.float32)
                                            w_pix = w_lane + o_d * sw_d + o_h * sw_h + o_w * sw_w
                                            for r in tl.static_range(ROWS):
                                                for kh in tl.static_range(KH):
                                                    # Tap row kh takes input row r from
                                                    # output row j: r*S = j*S - (res+PAD-kh*DIL).
                                                    if r * SH + res_h + PH - kh * DH == j * SH:
                                                        tap = (kd * KH + kh) * KW + kw
                                                        wv = tl.load(
                                                            w_ptr + w_pix + tap * sw_t,
                                                            mask=ok,
                                                            other=0.0,
                                                        ).to(tl.float32)
                                                        acc = _add_at(acc, r, gv * wv[:, None])
                        gx_chan = _channels(gx_ptr, gx_lane, sgx_c, c0, BLOCK_C, ALIGN)
                        for r in tl.static_range(ROWS):
                            i_h = res_h + (q_h0 + r) * SH
                            inside = in_lane & (i_d < D) & (i_h < H) & (i_w < W) & (q_h0 + r < QH)
                            pixel = i_d * sgx_d + i_h * sgx_h + i_w * sgx_w
                            tl.store(
                                _at(gx_chan, pixel, ALIGN),
                                acc[r].to(gx_ptr.dtype.element_ty),
                                mask=_channel_mask(inside, c0, CG, BLOCK_C),
                            )


@triton.jit(do_not_specialize=_RUNTIME)
def involution_grad_kernel_kernel(
    gy_ptr,  # (B, C, OD, OH, OW)
    x_ptr,  # (B, C, D, H, W)
    gw_ptr,  # (B, G, T, OD, OH, OW)
    G,
    D,
    H,
    W,
    OD,
    OH,
    OW,
    NBLK,
    sgy_b,
    sgy_c,
    sgy_d,
    sgy_h,
    sgy_w,
    sx_b,
    sx_c,
    sx_d,
    sx_h,
    sx_w,
    sgw_b,
    sgw_g,
    sgw_t,
    sgw_d,
    sgw_h,
    sgw_w,
    CG: tl.constexpr,
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
    CL: tl.constexpr,
    ALIGN: tl.constexpr,
    TAPS_INNER: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
    ROWS: tl.constexpr,
):
    b, g, q, in_lane = _lanes(G, OD * tl.cdiv(OH, ROWS) * OW, NBLK, BLOCK_P, CL)
    od, oh0, ow = _strips(q, OH, OW, ROWS)
    if CL:
        sx_c = 1
        sgy_c = 1
    if TAPS_INNER:
        sgw_t = 1
    gy_ptr += b * sgy_b * ALIGN
    x_ptr += b * sx_b * ALIGN
    gw_ptr += b * sgw_b
    x_lane = g * (CG // ALIGN * sx_c)
    gw_lane = g * sgw_g + od * sgw_d + ow * sgw_w
    gy_lane = g * (CG // ALIGN * sgy_c) + od * sgy_d + ow * sgy_w
    SPAN: tl.constexpr = (ROWS - 1) * SH + (KH - 1) * DH + 1
    # When one chunk holds the group, grad_out stays in registers across all taps.
    RESIDENT: tl.constexpr = CG <= BLOCK_C
    if RESIDENT:
        gy_chan = _channels(gy_ptr, gy_lane, sgy_c, 0, BLOCK_C, ALIGN)
        gy_strip = _load_strip(gy_chan, sgy_h, oh0, OH, in_lane, 0, CG, BLOCK_C, ALIGN, ROWS)
    for kd in tl.static_range(KD):
        i_d = od * SD - PD + kd * DD
        ok_d = in_lane & (i_d >= 0) & (i_d < D)
        for j in tl.static_range(SPAN):
            i_h = oh0 * SH - PH + j
            ok_h = ok_d & (i_h >= 0) & (i_h < H)
            # One sum per (strip row r, column offset kw), index r * KW + kw, over the channels.
            sums = _zeros(ROWS * KW, (BLOCK_P,))
            for c0 in range(0, CG, BLOCK_C):
                if RESIDENT:
                    gy = gy_strip
                else:
                    gy_chan = _channels(gy_ptr, gy_lane, sgy_c, c0, BLOCK_C, ALIGN)
                    gy = _load_strip(gy_chan, sgy_h, oh0, OH, in_lane, c0, CG, BLOCK_C, ALIGN, ROWS)
                x_chan = _channels(x_ptr, x_lane, sx_c, c0, BLOCK_C, ALIGN)
                for kw in tl.static_range(KW):
                    i_w = ow * SW - PW + kw * DW
                    ok = ok_h & (i_w >= 0) & (i_w < W)
                    pixel = i_d * sx_d + i_h * sx_h + i_w * sx_w
                    xv = tl.load(
                        _at(x_chan, pixel, ALIGN),
                        mask=_channel_mask(ok, c0, CG, BLOCK_C),
                        other=0.0,
                    ).to(tl.float32)
                    for r in tl.static_range(ROWS):
                        for kh in tl.static_range(KH):
                            if r * SH + kh * DH == j:
                                sums = _add_at(sums, r * KW + kw, tl.sum(gy[r] * xv, axis=1))
            # Window row j completes kernel row kh of strip row r where r * SH + kh * DH == j.
            for r in tl.static_range(ROWS):
                for kh in tl.static_range(KH):
                    if r * SH + kh * DH == j:
                        _store_tap_row(
                            gw_ptr,
                            gw_lane + (oh0 + r) * sgw_h,
                            (kd * KH + kh) * KW,
                            sgw_t,
                            in_lane & (oh0 + r < OH),
                            sums[r * KW : (r + 1) * KW],
                            KW,
                            BLOCK_P,
                        )
