"""Triton kernels of the involution op (Li et al., CVPR 2021, arXiv 2103.06255, Eq. 4).

Every kernel is written for three spatial dimensions; 1D and 2D problems reach them through an
exact reshape that gives the missing dimensions size 1 and kernel size 1 (see ``launch.py``).
Tensors are contiguous and viewed per (batch, group) row ``n`` in ``[0, B * G)``::

    x   (B*G, Cg, D, H, W)          input, Cg = C // G channels per group
    w   (B*G, T, OD, OH, OW)        per-pixel kernel, T = KD * KH * KW taps in row-major order
    y   (B*G, Cg, OD, OH, OW)       output

Each program owns one row ``n`` and a block of BLOCK_P flattened pixels, loops over the group's
channels BLOCK_C at a time and over the taps with compile-time loops, and accumulates in float32.
Tiles are (BLOCK_P, BLOCK_C), pixels first: each thread holds the BLOCK_C channels of its pixel,
so one kernel value serves them all from a register, and consecutive lanes touch consecutive
pixels, so every load is coalesced.
No program writes where another one does, so there are no atomics and results are
deterministic: the input gradient is a gather over taps (each input pixel collects from the
output pixels that read it), the kernel gradient sums over the group's channels inside the
program.

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
_SIZES = ["D", "H", "W", "OD", "OH", "OW"]


@triton.jit
def _split_index(p, OH, OW):
    """Flattened pixel index -> (depth, row, column)."""
    col = p % OW
    rest = p // OW
    return rest // OH, rest % OH, col


@triton.jit(do_not_specialize=_SIZES)
def involution_forward_kernel(
    x_ptr,  # (B*G, Cg, D, H, W)
    w_ptr,  # (B*G, T, OD, OH, OW)
    y_ptr,  # (B*G, Cg, OD, OH, OW)
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
):
    P = OD * OH * OW
    blocks = tl.cdiv(P, BLOCK_P)
    pid = tl.program_id(0)
    n = (pid // blocks).to(tl.int64)
    p = (pid % blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    in_p = p < P
    od, oh, ow = _split_index(p, OH, OW)
    T: tl.constexpr = KD * KH * KW
    x_row = x_ptr + n * CG * D * H * W
    w_row = w_ptr + n * T * P
    y_row = y_ptr + n * CG * P
    for c0 in range(0, CG, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        in_c = c < CG
        x_chan = x_row + c[None, :] * (D * H * W)
        acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        for kd in tl.static_range(KD):
            i_d = od * SD - PD + kd * DD
            ok_d = in_p & (i_d >= 0) & (i_d < D)
            for kh in tl.static_range(KH):
                i_h = oh * SH - PH + kh * DH
                ok_h = ok_d & (i_h >= 0) & (i_h < H)
                for kw in tl.static_range(KW):
                    i_w = ow * SW - PW + kw * DW
                    ok = ok_h & (i_w >= 0) & (i_w < W)
                    tap = (kd * KH + kh) * KW + kw
                    wv = tl.load(w_row + tap * P + p, mask=in_p, other=0.0).to(tl.float32)
                    offset = (i_d * H + i_h) * W + i_w
                    xv = tl.load(
                        x_chan + offset[:, None], mask=ok[:, None] & in_c[None, :], other=0.0
                    ).to(tl.float32)
                    acc += xv * wv[:, None]
        tl.store(
            y_row + c[None, :] * P + p[:, None],
            acc.to(y_ptr.dtype.element_ty),
            mask=in_p[:, None] & in_c[None, :],
        )


@triton.jit(do_not_specialize=_SIZES)
def involution_grad_input_kernel(
    gy_ptr,  # (B*G, Cg, OD, OH, OW)
    w_ptr,  # (B*G, T, OD, OH, OW)
    gx_ptr,  # (B*G, Cg, D, H, W)
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
):
    # Output pixel o reads input pixel i = o * S - PAD + k * DIL, so tap k reaches i from
    # o = (i + PAD - k * DIL) / S when that divides exactly. Each program takes the input pixels
    # of one residue class r = i mod S per dimension: whether a tap reaches them is then one
    # decision for the whole program, and strided layers skip the taps that cannot contribute.
    QD = tl.cdiv(D, SD)
    QH = tl.cdiv(H, SH)
    QW = tl.cdiv(W, SW)
    Q = QD * QH * QW
    P = OD * OH * OW
    blocks = tl.cdiv(Q, BLOCK_P)
    pid = tl.program_id(0)
    block = pid % blocks
    rest = pid // blocks
    r_w = rest % SW
    rest = rest // SW
    r_h = rest % SH
    rest = rest // SH
    r_d = rest % SD
    n = (rest // SD).to(tl.int64)
    q = block * BLOCK_P + tl.arange(0, BLOCK_P)
    q_d, q_h, q_w = _split_index(q, QH, QW)
    i_d = r_d + q_d * SD
    i_h = r_h + q_h * SH
    i_w = r_w + q_w * SW
    in_q = (q < Q) & (i_d < D) & (i_h < H) & (i_w < W)
    T: tl.constexpr = KD * KH * KW
    gy_row = gy_ptr + n * CG * P
    w_row = w_ptr + n * T * P
    gx_row = gx_ptr + n * CG * D * H * W
    for c0 in range(0, CG, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        in_c = c < CG
        gy_chan = gy_row + c[None, :] * P
        acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        for kd in tl.static_range(KD):
            num_d = r_d + PD - kd * DD
            if num_d % SD == 0:
                o_d = q_d + num_d // SD
                ok_d = in_q & (o_d >= 0) & (o_d < OD)
                for kh in tl.static_range(KH):
                    num_h = r_h + PH - kh * DH
                    if num_h % SH == 0:
                        o_h = q_h + num_h // SH
                        ok_h = ok_d & (o_h >= 0) & (o_h < OH)
                        for kw in tl.static_range(KW):
                            num_w = r_w + PW - kw * DW
                            if num_w % SW == 0:
                                o_w = q_w + num_w // SW
                                ok = ok_h & (o_w >= 0) & (o_w < OW)
                                tap = (kd * KH + kh) * KW + kw
                                o = (o_d * OH + o_h) * OW + o_w
                                wv = tl.load(w_row + tap * P + o, mask=ok, other=0.0)
                                gv = tl.load(
                                    gy_chan + o[:, None],
                                    mask=in_c[None, :] & ok[:, None],
                                    other=0.0,
                                )
                                acc += gv.to(tl.float32) * wv.to(tl.float32)[:, None]
        i = (i_d * H + i_h) * W + i_w
        tl.store(
            gx_row + c[None, :] * (D * H * W) + i[:, None],
            acc.to(gx_ptr.dtype.element_ty),
            mask=in_c[None, :] & in_q[:, None],
        )


@triton.jit(do_not_specialize=_SIZES)
def involution_grad_kernel_kernel(
    gy_ptr,  # (B*G, Cg, OD, OH, OW)
    x_ptr,  # (B*G, Cg, D, H, W)
    gw_ptr,  # (B*G, T, OD, OH, OW)
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
):
    P = OD * OH * OW
    blocks = tl.cdiv(P, BLOCK_P)
    pid = tl.program_id(0)
    n = (pid // blocks).to(tl.int64)
    p = (pid % blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    in_p = p < P
    od, oh, ow = _split_index(p, OH, OW)
    T: tl.constexpr = KD * KH * KW
    x_row = x_ptr + n * CG * D * H * W
    gy_row = gy_ptr + n * CG * P
    gw_row = gw_ptr + n * T * P
    c = tl.arange(0, BLOCK_C)
    if CG <= BLOCK_C:
        # One chunk holds the group: grad_out stays in registers across the taps.
        gv_all = tl.load(
            gy_row + c[None, :] * P + p[:, None],
            mask=(c < CG)[None, :] & in_p[:, None],
            other=0.0,
        ).to(tl.float32)
    for kd in tl.static_range(KD):
        i_d = od * SD - PD + kd * DD
        ok_d = in_p & (i_d >= 0) & (i_d < D)
        for kh in tl.static_range(KH):
            i_h = oh * SH - PH + kh * DH
            ok_h = ok_d & (i_h >= 0) & (i_h < H)
            for kw in tl.static_range(KW):
                i_w = ow * SW - PW + kw * DW
                ok = ok_h & (i_w >= 0) & (i_w < W)
                offset = (i_d * H + i_h) * W + i_w
                if CG <= BLOCK_C:
                    xv = tl.load(
                        x_row + c[None, :] * (D * H * W) + offset[:, None],
                        mask=(c < CG)[None, :] & ok[:, None],
                        other=0.0,
                    ).to(tl.float32)
                    total = tl.sum(gv_all * xv, axis=1)
                else:
                    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
                    for c0 in range(0, CG, BLOCK_C):
                        cc = c0 + c
                        in_c = cc < CG
                        gv = tl.load(
                            gy_row + cc[None, :] * P + p[:, None],
                            mask=in_c[None, :] & in_p[:, None],
                            other=0.0,
                        ).to(tl.float32)
                        xv = tl.load(
                            x_row + cc[None, :] * (D * H * W) + offset[:, None],
                            mask=in_c[None, :] & ok[:, None],
                            other=0.0,
                        ).to(tl.float32)
                        acc += gv * xv
                    total = tl.sum(acc, axis=1)
                tap = (kd * KH + kh) * KW + kw
                tl.store(gw_row + tap * P + p, total.to(gw_ptr.dtype.element_ty), mask=in_p)
