"""Triton kernels of the fused involution: each pixel's kernel is generated where it is used.

The fused op computes ``involution(x, span(f))`` (Li et al., CVPR 2021, arXiv 2103.06255, Eq. 4
and 6) where ``span(f) = f @ W^T + b`` maps R hidden features of an output pixel to the G * T
kernel values of its G groups, T = KD * KH * KW taps in row-major order::

    K[p, g, t] = sum_r f[p, r] * W[g * T + t, r] + b[g * T + t]
    y[p, c]    = sum_t K[p, g(c), t] * x[nbr(p, t), c]        (zero outside the input)

The kernel tensor K (B, G, T, *out) is never written to memory, in the forward or the backward.

Every kernel is written for three spatial dimensions; 1D and 2D problems give the leading
dimensions size 1 (kernel size 1, stride 1, padding 0). Tensors are read and written through
their strides, so channels-last tensors are used where they lie: a pixel's group channels are
then contiguous and load as vectors. Pixels are flattened over (batch, *spatial) and cut into
tiles of BLOCK_P; a program takes one tile and one group (or all groups, where it must sum over
them). Accumulation is in float32.

Kernel rows. Every kernel walks the kernel's rows (KD * KH of them, 7 at K = 7) in a loop
that is not unrolled and unrolls the KW taps of a row. Unrolled whole, 49 taps of independent
loads let the compiler issue loads, masks and addresses far ahead of their use, which spilled
registers, and took about 4 s per kernel to compile (125 s for RedNet-50's 32 fused kernels in
bfloat16, against 34 s with the row loop; first-use compile time counts toward a network's first
step).

Forward (``fused_forward_kernel``). A row's kernels come from one ``tl.dot``, features
[P, R] @ W_row^T [R, WP] (WP = KW rounded up to a power of two, at least 16, the smallest dot),
on tensor cores for 16-bit types and in tf32 or fp32 for float32; the features are loaded once
per tile when they fit one chunk of BLOCK_R (every RedNet-50 width). The aggregation then needs column t of that register tile for each tap: it is taken
apart by a split tree (``_columns``: reshape to [P, w/2, 2] and ``tl.split``, four levels for
WP = 16) into WP vectors [P]. After one layout conversion of the tile (one shared-memory round
trip per row), each split only renames registers, and the vectors come out in the layout of the
channel tiles the taps load, so the taps run on registers alone: a vector load of the group's
channels and one FMA per channel. Alternatives compiled for sm_90 at K = 7: extracting each
column with a masked ``tl.sum`` or ``tl.gather`` made the compiler convert a tile through
shared memory at every tap (50 and 100 barriers per tile instead of 3 for a 49-tap tile); a
global scratch tile would reintroduce the memory traffic the fusion removes.

Backward. The kernel gradient of a pixel, ``dK[p, t] = sum_c gy[p, c] * x[nbr(p, t), c]``, is
formed row by row in registers (``_kernel_gradient_row``) and assembled into a [P, WP] tile by
the inverse tree (``_tile``, ``tl.join``), which feeds ``tl.dot`` at once, rounded to the
input's dtype as the unfused layer stores it:

* ``fused_grad_features_kernel``: d_features[p] = sum_g dK_g[p] @ W_g, the groups and rows
  summed in a fixed order inside the program that owns the tile;
* ``fused_grad_weight_kernel``: per (chunk of tiles, group, kernel row) partial sums
  dW_row = dK_row^T @ f and d_bias_row = sum_p dK_row (as dK_row^T @ ones, on the tensor cores
  too), written to a buffer and reduced over chunks in a fixed order on the host.
  No floating-point atomics anywhere: results are bit-identical from run to run.

The two need dK in different loop orders (groups innermost for d_features, pixels innermost for
dW), and neither accumulator fits in registers across the other's loop, so each recomputes dK.

* ``fused_grad_input_kernel``: a gather over taps, as in ``kernels.py``: input pixel i collects
  ``K[o, t] * gy[o, c]`` from the output pixels o that read it; a program takes the input
  pixels of one residue modulo the stride, so which taps reach them is a uniform branch.
  K[o, t] is recomputed per tap as a dot of o's R features with row t of W_g on CUDA cores
  (R FMAs per tap and pixel, features read where they lie: L1 hits, as o's neighbours are read
  by the neighbouring lanes). It costs about (1 + R / CG) times the loads of a plain
  grad_input, against the alternatives' K round trip through memory: a tensor-core dot needs a
  whole tile of K at the shifted pixels o, which Triton can only hold in registers of other
  threads (no shifted register views) or in a global scratch tile.

``benchmarks/bench_fused_gpu.py --sass`` compiles every kernel for sm_90 and counts registers,
spills and tensor-core instructions.

The hidden feature count R is a compile-time constant, like the channels per group: the chunk
loops over it then have known bounds and aligned starts (vector loads, masks folded away when R
fills its block), and a network compiles one variant per layer width, as it does anyway for the
block sizes. Loops over runtime bounds are ``while`` loops: Triton's interpreter cannot take a
runtime bound in ``range`` with NumPy 2.4.

Sizes and offsets are int32 unless the host sets WIDE (an offset or the pixel count may reach
2**31); then pixel indices and offsets are computed in int64.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Split and join trees have log2(width) levels; 10 cover kernel rows of up to 1024 taps.
_MAX_LEVELS = tl.constexpr(10)
# The narrowest operand tl.dot takes: the columns of ones that sum d_bias.
_ONES = tl.constexpr(16)
# Triton's interpreter holds bfloat16 as uint16 and its tl.dot multiplies those integers: there,
# bfloat16 operands are widened to float32 first (their products are exact in float32 either way).
_WIDEN_BF16_DOTS = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def _index(value, WIDE: tl.constexpr):
    """``value`` in the integer width of the offsets: int64 when WIDE, unchanged otherwise."""
    if WIDE:
        value = value.to(tl.int64)
    return value


@triton.jit
def _pixel_tile(tile, NPIX, S1, S2, S3, BLOCK_P: tl.constexpr, WIDE: tl.constexpr):
    """Batch and (depth, height, width) index of the BLOCK_P pixels of tile ``tile`` of the
    flattened (B, S1, S2, S3) grid, and whether each exists."""
    q = _index(tile, WIDE) * BLOCK_P + tl.arange(0, BLOCK_P)
    valid = q < NPIX
    i3 = q % S3
    rest = q // S3
    i2 = rest % S2
    rest = rest // S2
    return rest // S1, rest % S1, i2, i3, valid


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
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """``acc + a @ b`` with float32 accumulation."""
    if _WIDEN_BF16_DOTS and a.dtype == tl.bfloat16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _columns(tile, BLOCK_P: tl.constexpr, WIDTH: tl.constexpr):
    """The WIDTH columns of a [BLOCK_P, WIDTH] tile as a tuple of [BLOCK_P] vectors, in order.

    Each level splits every tile into its even and odd columns and lists all the even halves
    before all the odd ones, so that after log2(WIDTH) levels entry j is column j.
    """
    cols = (tile,)
    for level in tl.static_range(_MAX_LEVELS):
        if (WIDTH >> level) > 1:
            evens = ()
            odds = ()
            for j in tl.static_range(1 << level):
                if (WIDTH >> level) == 2:
                    even, odd = tl.split(cols[j])
                else:
                    even, odd = tl.split(tl.reshape(cols[j], (BLOCK_P, WIDTH >> (level + 1), 2)))
                evens = evens + (even,)  # type: ignore[assignment]  # noqa: RUF005
                odds = odds + (odd,)  # type: ignore[assignment]  # noqa: RUF005
            cols = evens + odds  # type: ignore[assignment]
    return cols


@triton.jit
def _tile(cols, BLOCK_P: tl.constexpr, WIDTH: tl.constexpr):
    """The [BLOCK_P, WIDTH] tile whose columns are the WIDTH vectors ``cols``: ``_columns`` inverted."""
    for level in tl.static_range(_MAX_LEVELS):
        if (1 << level) < WIDTH:
            joined = ()
            for j in tl.static_range(WIDTH >> (level + 1)):
                pair = tl.join(cols[j], cols[j + (WIDTH >> (level + 1))])
                if level > 0:
                    pair = tl.reshape(pair, (BLOCK_P, 2 << level))
                joined = joined + (pair,)  # type: ignore[assignment]  # noqa: RUF005
            cols = joined
    return cols[0]


@triton.jit
def _features(f_pix, sf_c, valid, r0: tl.constexpr, R: tl.constexpr, BLOCK_R: tl.constexpr):
    """Features r0 .. r0 + BLOCK_R of each pixel of a tile, [BLOCK_P, BLOCK_R] (zero past R)."""
    r = r0 + tl.arange(0, BLOCK_R)
    mask = valid[:, None] & (r < R)[None, :]
    return tl.load(f_pix[:, None] + r[None, :] * sf_c, mask=mask, other=0.0)


@triton.jit
def _generate_row(
    f0,
    f_pix,
    sf_c,
    w_row,
    sw_t,
    sw_r,
    bias_row,
    sb,
    valid,
    R: tl.constexpr,
    KW: tl.constexpr,
    WP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One kernel row's kernels of a tile for one group, [BLOCK_P, WP] float32:
    f [P, R] @ W_row^T [R, WP] + b_row, taps past KW zero.

    ``f0`` holds the first BLOCK_R features (loaded once per tile by the caller), ``f_pix``
    points at each pixel's first feature for the others; ``w_row`` and ``bias_row`` point at
    the row's first tap in W and b.
    """
    j = tl.arange(0, WP)
    acc = tl.zeros((f0.shape[0], WP), dtype=tl.float32)
    for r0 in tl.static_range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        w = tl.load(
            w_row + j[None, :] * sw_t + r[:, None] * sw_r,
            mask=(j < KW)[None, :] & (r < R)[:, None],
            other=0.0,
        )
        f = f0 if r0 == 0 else _features(f_pix, sf_c, valid, r0, R, BLOCK_R)
        acc = _dot(f, w, acc, PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_row + j * sb, mask=j < KW, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _kernel_gradient_row(
    gy0,
    gy_pix,
    sgy_c,
    x_row,
    sx_c,
    sx_w,
    iw0,
    ok_row,
    W,
    CG: tl.constexpr,
    KW: tl.constexpr,
    DW: tl.constexpr,
    WP: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One kernel row of dK[p, t] = sum_c gy[p, c] * x[nbr(p, t), c] over one group's
    channels, as WP float32 vectors [BLOCK_P] (zero past KW).

    ``gy0`` holds the first BLOCK_C channels of grad_out, loaded by the caller (d_features
    loads them once for all kernel rows); ``gy_pix`` points at each pixel's first group channel
    of it for the others; ``x_row``
    points at the first group channel of the input row that the kernel row reads, ``iw0`` is
    the window's first column and ``ok_row`` whether the row lies inside the input.
    """
    dk = _zeros(WP, (gy0.shape[0],))
    for c0 in tl.static_range(0, CG, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        in_c = c < CG
        if c0 == 0:
            gy = gy0
        else:
            gy = tl.load(
                gy_pix[:, None] + c[None, :] * sgy_c, mask=ok_row[:, None] & in_c[None, :]
            ).to(tl.float32)
        for kw in tl.static_range(KW):
            i_w = iw0 + kw * DW
            ok = ok_row & (i_w >= 0) & (i_w < W)
            xv = tl.load(
                (x_row + i_w * sx_w)[:, None] + c[None, :] * sx_c,
                mask=ok[:, None] & in_c[None, :],
                other=0.0,
            ).to(tl.float32)
            dk = _add_at(dk, kw, tl.sum(gy * xv, axis=1))
    return dk


@triton.jit
def _channels(ptr, sc, valid, c0: tl.constexpr, CG: tl.constexpr, BLOCK_C: tl.constexpr):
    """Channels c0 .. c0 + BLOCK_C of a group at each pixel of a tile, as float32."""
    c = c0 + tl.arange(0, BLOCK_C)
    mask = valid[:, None] & (c < CG)[None, :]
    return tl.load(ptr[:, None] + c[None, :] * sc, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def fused_forward_kernel(
    x_ptr,  # (B, C, D, H, W), any strides
    f_ptr,  # (B, R, OD, OH, OW), any strides
    w_ptr,  # (G * T, R)
    b_ptr,  # (G * T,); unused when HAS_BIAS is false
    y_ptr,  # (B, C, OD, OH, OW), any strides
    NPIX,  # B * OD * OH * OW
    G,
    D,
    H,
    W,
    OD,
    OH,
    OW,
    sx_b,
    sx_c,
    sx_d,
    sx_h,
    sx_w,
    sf_b,
    sf_c,
    sf_d,
    sf_h,
    sf_w,
    sy_b,
    sy_c,
    sy_d,
    sy_h,
    sy_w,
    sw_t,
    sw_r,
    sb,
    CG: tl.constexpr,
    R: tl.constexpr,
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
    HAS_BIAS: tl.constexpr,
    WP: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr,
    WIDE: tl.constexpr,
):
    T: tl.constexpr = KD * KH * KW
    CHUNKS: tl.constexpr = (CG + BLOCK_C - 1) // BLOCK_C
    # The groups of a tile are neighbouring programs: its features are read from L2 once.
    pid = tl.program_id(0)
    tile = pid // G
    g = _index(pid % G, WIDE)
    b, od, oh, ow, valid = _pixel_tile(tile, NPIX, OD, OH, OW, BLOCK_P, WIDE)
    f_pix = f_ptr + b * sf_b + od * sf_d + oh * sf_h + ow * sf_w
    f0 = _features(f_pix, sf_c, valid, 0, R, BLOCK_R)
    id0 = od * SD - PD
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW
    x_group = x_ptr + b * sx_b + g * CG * sx_c
    acc = _zeros(CHUNKS, (BLOCK_P, BLOCK_C))
    for row in range(KD * KH):
        first = g * T + row * KW
        kernel = _generate_row(
            f0,
            f_pix,
            sf_c,
            w_ptr + first * sw_t,
            sw_t,
            sw_r,
            b_ptr + first * sb,
            sb,
            valid,
            R,
            KW,
            WP,
            HAS_BIAS,
            BLOCK_R,
            PRECISION,
        )
        taps = _columns(kernel, BLOCK_P, WP)
        i_d = id0 + row // KH * DD
        i_h = ih0 + row % KH * DH
        ok_row = valid & (i_d >= 0) & (i_d < D) & (i_h >= 0) & (i_h < H)
        x_row = x_group + i_d * sx_d + i_h * sx_h
        for chunk in tl.static_range(CHUNKS):
            c = chunk * BLOCK_C + tl.arange(0, BLOCK_C)
            in_c = c < CG
            total = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
            for kw in tl.static_range(KW):
                i_w = iw0 + kw * DW
                ok = ok_row & (i_w >= 0) & (i_w < W)
                xv = tl.load(
                    (x_row + i_w * sx_w)[:, None] + c[None, :] * sx_c,
                    mask=ok[:, None] & in_c[None, :],
                    other=0.0,
                )
                total += taps[kw][:, None] * xv.to(tl.float32)
            acc = _add_at(acc, chunk, total)
    y_pix = y_ptr + b * sy_b + od * sy_d + oh * sy_h + ow * sy_w + g * CG * sy_c
    for chunk in tl.static_range(CHUNKS):
        c = chunk * BLOCK_C + tl.arange(0, BLOCK_C)
        tl.store(
            y_pix[:, None] + c[None, :] * sy_c,
            acc[chunk].to(y_ptr.dtype.element_ty),
            mask=valid[:, None] & (c < CG)[None, :],
        )


@triton.jit
def fused_grad_features_kernel(
    gy_ptr,  # (B, C, OD, OH, OW), any strides
    x_ptr,  # (B, C, D, H, W), any strides
    w_ptr,  # (G * T, R)
    gf_ptr,  # (B, R, OD, OH, OW), any strides
    NPIX,
    G,
    D,
    H,
    W,
    OD,
    OH,
    OW,
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
    sgf_b,
    sgf_c,
    sgf_d,
    sgf_h,
    sgf_w,
    sw_t,
    sw_r,
    CG: tl.constexpr,
    R: tl.constexpr,
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
    WP: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr,
    WIDE: tl.constexpr,
):
    """d_features[p] = sum_g dK_g[p] @ W_g for one tile, summed over groups in order."""
    T: tl.constexpr = KD * KH * KW
    b, od, oh, ow, valid = _pixel_tile(tl.program_id(0), NPIX, OD, OH, OW, BLOCK_P, WIDE)
    id0 = od * SD - PD
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW
    gy_pix = gy_ptr + b * sgy_b + od * sgy_d + oh * sgy_h + ow * sgy_w
    x_batch = x_ptr + b * sx_b
    gf_pix = gf_ptr + b * sgf_b + od * sgf_d + oh * sgf_h + ow * sgf_w
    j = tl.arange(0, WP)
    # One chunk when R <= BLOCK_R (every RedNet-50 layer but the last stage's, R = 128); wider
    # features recompute dK per chunk.
    for r0 in tl.static_range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        in_r = r < R
        acc = tl.zeros((BLOCK_P, BLOCK_R), dtype=tl.float32)
        g = 0
        while g < G:
            channel = _index(g, WIDE) * CG
            gy_group = gy_pix + channel * sgy_c
            gy0 = _channels(gy_group, sgy_c, valid, 0, CG, BLOCK_C)
            for row in range(KD * KH):
                i_d = id0 + row // KH * DD
                i_h = ih0 + row % KH * DH
                ok_row = valid & (i_d >= 0) & (i_d < D) & (i_h >= 0) & (i_h < H)
                dk = _kernel_gradient_row(
                    gy0,
                    gy_group,
                    sgy_c,
                    x_batch + channel * sx_c + i_d * sx_d + i_h * sx_h,
                    sx_c,
                    sx_w,
                    iw0,
                    ok_row,
                    W,
                    CG,
                    KW,
                    DW,
                    WP,
                    BLOCK_C,
                )
                first = _index(g, WIDE) * T + row * KW
                w = tl.load(
                    w_ptr + (first + j)[:, None] * sw_t + r[None, :] * sw_r,
                    mask=(j < KW)[:, None] & in_r[None, :],
                    other=0.0,
                )
                acc = _dot(_tile(dk, BLOCK_P, WP).to(w.dtype), w, acc, PRECISION)
            g += 1
        tl.store(
            gf_pix[:, None] + r[None, :] * sgf_c,
            acc.to(gf_ptr.dtype.element_ty),
            mask=valid[:, None] & in_r[None, :],
        )


@triton.jit
def fused_grad_weight_kernel(
    gy_ptr,  # (B, C, OD, OH, OW), any strides
    x_ptr,  # (B, C, D, H, W), any strides
    f_ptr,  # (B, R, OD, OH, OW), any strides
    gw_ptr,  # (CHUNKS, G * T, R) float32, contiguous: partial sums of d_weight
    gb_ptr,  # (CHUNKS, G * T) float32, contiguous: partial sums of d_bias
    NPIX,
    NTILES,
    TILES_PER_CHUNK,
    G,
    D,
    H,
    W,
    OD,
    OH,
    OW,
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
    sf_b,
    sf_c,
    sf_d,
    sf_h,
    sf_w,
    CG: tl.constexpr,
    R: tl.constexpr,
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
    WP: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    PRECISION: tl.constexpr,
    WIDE: tl.constexpr,
):
    """Partial sums over one chunk of tiles of dW_g = dK_g^T @ f and d_bias_g = sum_p dK_g,
    one kernel row at a time (the row's accumulators stay in registers over the tiles)."""
    T: tl.constexpr = KD * KH * KW
    pid = tl.program_id(0)
    chunk = pid // G
    g = _index(pid % G, WIDE)
    first_tile = chunk * TILES_PER_CHUNK
    last_tile = tl.minimum(first_tile + TILES_PER_CHUNK, NTILES)
    j = tl.arange(0, WP)
    column = tl.arange(0, _ONES)
    for r0 in tl.static_range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        in_r = r < R
        for row in range(KD * KH):
            acc_w = tl.zeros((WP, BLOCK_R), dtype=tl.float32)
            # d_bias as a product with columns of ones, on the tensor cores beside d_weight:
            # a sum over the tile's pixels would cross every lane of the program at each tile.
            acc_b = tl.zeros((WP, _ONES), dtype=tl.float32)
            tile = first_tile
            while tile < last_tile:
                b, od, oh, ow, valid = _pixel_tile(tile, NPIX, OD, OH, OW, BLOCK_P, WIDE)
                i_d = od * SD - PD + row // KH * DD
                i_h = oh * SH - PH + row % KH * DH
                ok_row = valid & (i_d >= 0) & (i_d < D) & (i_h >= 0) & (i_h < H)
                gy_group = gy_ptr + b * sgy_b + od * sgy_d + oh * sgy_h + ow * sgy_w
                gy_group += g * CG * sgy_c
                dk = _kernel_gradient_row(
                    _channels(gy_group, sgy_c, valid, 0, CG, BLOCK_C),
                    gy_group,
                    sgy_c,
                    x_ptr + b * sx_b + g * CG * sx_c + i_d * sx_d + i_h * sx_h,
                    sx_c,
                    sx_w,
                    ow * SW - PW,
                    ok_row,
                    W,
                    CG,
                    KW,
                    DW,
                    WP,
                    BLOCK_C,
                )
                f_pix = f_ptr + b * sf_b + od * sf_d + oh * sf_h + ow * sf_w
                f = _features(f_pix, sf_c, valid, r0, R, BLOCK_R)
                dk_t = tl.trans(_tile(dk, BLOCK_P, WP).to(f.dtype))
                acc_w = _dot(dk_t, f, acc_w, PRECISION)
                ones = tl.full((BLOCK_P, _ONES), 1.0, tl.float32).to(f.dtype)
                acc_b = _dot(dk_t, ones, acc_b, PRECISION)
                tile += 1
            # Row of each tap in the (CHUNKS * G * T) rows of the partial sums.
            rows = (_index(chunk, WIDE) * G + g) * T + row * KW + j
            tl.store(
                gw_ptr + rows[:, None] * R + r[None, :],
                acc_w,
                mask=(j < KW)[:, None] & in_r[None, :],
            )
            if r0 == 0:
                # Every column of acc_b holds the sums; the first is stored.
                tl.store(
                    gb_ptr + rows[:, None] + 0 * column[None, :],
                    acc_b,
                    mask=(j < KW)[:, None] & (column == 0)[None, :],
                )


@triton.jit
def _recomputed_kernel(
    f_pix,
    sf_c,
    w_row,
    sw_r,
    R: tl.constexpr,
    ok,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """K[o, t] without the bias: the dot of each pixel's R features with row t of W, float32.

    Features are read in chunks of BLOCK_C, the width of the channel tiles they multiply, so
    that the sums land in the channel tiles' layout.
    """
    k = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_C):
        r = r0 + tl.arange(0, BLOCK_C)
        in_r = r < R
        f = tl.load(f_pix[:, None] + r[None, :] * sf_c, mask=ok[:, None] & in_r[None, :], other=0.0)
        w = tl.load(w_row + r * sw_r, mask=in_r, other=0.0)
        k += tl.sum(f.to(tl.float32) * w.to(tl.float32)[None, :], axis=1)
    return k


@triton.jit
def fused_grad_input_kernel(
    gy_ptr,  # (B, C, OD, OH, OW), any strides
    f_ptr,  # (B, R, OD, OH, OW), any strides
    w_ptr,  # (G * T, R)
    b_ptr,  # (G * T,); unused when HAS_BIAS is false
    gx_ptr,  # (B, C, D, H, W), any strides
    NQ,  # B * QD * QH * QW: input pixels of one residue class
    G,
    D,
    H,
    W,
    OD,
    OH,
    OW,
    QD,
    QH,
    QW,
    sgy_b,
    sgy_c,
    sgy_d,
    sgy_h,
    sgy_w,
    sf_b,
    sf_c,
    sf_d,
    sf_h,
    sf_w,
    sgx_b,
    sgx_c,
    sgx_d,
    sgx_h,
    sgx_w,
    sw_t,
    sw_r,
    sb,
    CG: tl.constexpr,
    R: tl.constexpr,
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
    HAS_BIAS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    WIDE: tl.constexpr,
):
    """d_input of one group for a tile of input pixels of one residue modulo the stride.

    Output pixel o reads input pixel i = o * S - PAD + k * DIL, so tap k reaches i from
    o = (i + PAD - k * DIL) / S when that divides exactly. Lanes index the input on the
    quotient grid i = res + q * S, and axis 1 of the grid takes one residue ``res`` per
    program: which taps reach it is then the same for the whole program, a uniform branch.
    """
    T: tl.constexpr = KD * KH * KW
    pid = tl.program_id(0)
    tile = pid // G
    g = _index(pid % G, WIDE)
    residue = tl.program_id(1)
    res_w = residue % SW
    res_h = residue // SW % SH
    res_d = residue // (SW * SH)
    b, qd, qh, qw, valid = _pixel_tile(tile, NQ, QD, QH, QW, BLOCK_P, WIDE)
    i_d = res_d + qd * SD
    i_h = res_h + qh * SH
    i_w = res_w + qw * SW
    inside = valid & (i_d < D) & (i_h < H) & (i_w < W)
    gy_batch = gy_ptr + b * sgy_b + g * CG * sgy_c
    f_batch = f_ptr + b * sf_b
    gx_pix = gx_ptr + b * sgx_b + i_d * sgx_d + i_h * sgx_h + i_w * sgx_w + g * CG * sgx_c
    for c0 in tl.static_range(0, CG, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        in_c = c < CG
        acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        for kd in tl.static_range(KD):
            # Each offset divides exactly or not at all, so truncating and flooring agree.
            e_d = res_d + PD - kd * DD
            if e_d % SD == 0:
                o_d = qd + e_d // SD
                ok_d = inside & (o_d >= 0) & (o_d < OD)
                # Kernel rows in a loop that is not unrolled: unrolled, the compiler issued the
                # loads of every tap up front and spilled registers (stride 1, R >= 32).
                for kh in range(KH):
                    e_h = res_h + PH - kh * DH
                    if e_h % SH == 0:
                        o_h = qh + e_h // SH
                        ok_h = ok_d & (o_h >= 0) & (o_h < OH)
                        for kw in tl.static_range(KW):
                            e_w = res_w + PW - kw * DW
                            if e_w % SW == 0:
                                o_w = qw + e_w // SW
                                ok = ok_h & (o_w >= 0) & (o_w < OW)
                                row = g * T + (kd * KH + kh) * KW + kw
                                k = _recomputed_kernel(
                                    f_batch + o_d * sf_d + o_h * sf_h + o_w * sf_w,
                                    sf_c,
                                    w_ptr + row * sw_t,
                                    sw_r,
                                    R,
                                    ok,
                                    BLOCK_P,
                                    BLOCK_C,
                                )
                                if HAS_BIAS:
                                    k += tl.load(b_ptr + row * sb).to(tl.float32)
                                gy_o = gy_batch + o_d * sgy_d + o_h * sgy_h + o_w * sgy_w
                                gv = tl.load(
                                    gy_o[:, None] + c[None, :] * sgy_c,
                                    mask=ok[:, None] & in_c[None, :],
                                    other=0.0,
                                ).to(tl.float32)
                                acc += k[:, None] * gv
        tl.store(
            gx_pix[:, None] + c[None, :] * sgx_c,
            acc.to(gx_ptr.dtype.element_ty),
            mask=inside[:, None] & in_c[None, :],
        )
