"""`hae::slot_attention_fused`: the GPU implementation of slot attention, as Triton kernels.

Why a hand-written kernel: Inductor lowers the reference math (`attend_slots`) to matmul → softmax → matmul,
and at unaligned slot counts cuBLAS picks GEMV kernels for the two matmuls, well off the bandwidth floor. Decode
attention reads every K/V byte once and does little arithmetic per byte, so one streaming pass over the slots
(flash decoding) is the whole job.

Three launches, the last two only when needed:

1. `_split_kernel`, grid `(B * Hkv, row blocks, splits)`. A program takes the query rows of one KV head (all
   `Hq / Hkv` heads that share it, times `T` query tokens: GQA reads each K/V tile once) and one contiguous range
   of slots, and runs an online softmax over it in fp32, with the validity mask (`slot_pos >= 0`, the KV head's own row
   when `slot_pos` is per head, `[B, Hkv, C]`) applied inside. Both products are tensor-core dots, the rows padded
   to at least 16. With one split it writes the normalised output directly; with several (long caches, few heads) it
   writes partial (max, sum, accumulator) triples. When the per-slot weights are wanted it also writes the masked
   logits (fp32, log2 domain): `[B, Hq * T, C]`, written and read back once, adds 2-11% to the K/V bytes at the
   shapes of interest (32/32, 28/4, 8/1 heads), against 50% for a second read of K.
2. `_combine_kernel` (splits > 1 only) merges the partials of each query row.
3. `_weight_kernel` (weights only), grid `(B, slot blocks)`: `slot_weight[b, c] = sum over rows of
   exp2(logit - row max) / row sum, / Hq`, the reference's definition (mean over query heads, summed over
   query tokens); with per-head `slot_pos`, grid `(B * Hkv, slot blocks)` and `slot_weight[b, h, c]` sums the rows
   of KV head `h`'s query heads, `/ (Hq / Hkv)`.

Masking matches the reference exactly: a free slot's logit is `finfo(float32).min`, not `-inf`, so a row with
no valid slot gets the reference's uniform weights instead of NaN; slots past the capacity in the last tile
(padding inside the launch) get `-inf` and count for nothing. No capacity multiple is required: K/V rows are
`D` contiguous elements whatever `C` is, so tile loads stay coalesced at any slot count; the internal logits
buffer is padded to a multiple of 64 slots so its rows start 256-byte aligned.

Precision: K/V are cast to the query's dtype (as the reference does), products accumulate in fp32, fp32
inputs use IEEE fp32 dots (not tf32).

Quantized slots (int8 with one fp32 scale per slot and KV head, `hae_fx.kv_quant`): the tiles are read as int8
(half the bytes of bf16) and cast to the query's dtype, exact for |q| <= 127; the key scales multiply the logits
of their slots and the value scales the probabilities before the second product, so no dequantized tile exists.
Row sums and the per-slot weights use the unscaled probabilities, as with float slots.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

#: the reference's fill value for free slots (softmax of a row of these is uniform, not NaN)
FREE_SLOT_LOGIT = tl.constexpr(torch.finfo(torch.float32).min)
#: query rows (heads of one group times query tokens) per program; more rows take more row blocks. Fewer rows
#: are padded to MIN_BLOCK_R, the smallest tensor-core tile: wasted multiply-adds cost nothing in a pass bound by
#: memory, and on an H200 this ran 1.4-3x faster than one-row FMA reductions for 32/32 heads
MIN_BLOCK_R = 16
MAX_BLOCK_R = 64
#: slot tile of the streaming loop
BLOCK_C = 64
#: the logits buffer's row length is padded to this many slots (256-byte aligned fp32 rows)
LOGIT_ROW_ALIGN = 64
#: programs per multiprocessor the split heuristic aims for
PROGRAMS_PER_SM = 2
#: multiprocessors assumed with no GPU visible (Triton's CPU interpreter, tracing with fake CUDA tensors); small,
#: so that tests exercise the splits
INTERPRETER_SMS = 4
LOG2E = 1.4426950408889634


@triton.jit
def _split_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, out_ptr, part_acc_ptr, part_ml_ptr, logit_ptr, row_ml_ptr,
                  ks_ptr, vs_ptr,
                  stride_qb, stride_qh, stride_qt, stride_qd, stride_kb, stride_kh, stride_kc, stride_kd,
                  stride_vb, stride_vh, stride_vc, stride_vd, stride_pb, stride_ph, stride_pc,
                  stride_ksb, stride_ksh, stride_ksc, stride_vsb, stride_vsh, stride_vsc,
                  scale_log2, kv_heads, capacity, logit_stride, q_len, rows, slots_per_split,
                  D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                  SPLITS: tl.constexpr, NEED_WEIGHT: tl.constexpr, IEEE_DOT: tl.constexpr,
                  SCALED: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_r = tl.program_id(1)
    pid_s = tl.program_id(2)
    b = pid_bh // kv_heads
    kv_head = pid_bh % kv_heads

    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # row within the group: (head in group) * T + token
    row_ok = r < rows
    head = kv_head * (rows // q_len) + r // q_len
    token = r % q_len
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    q = tl.load(q_ptr + b * stride_qb + head[:, None] * stride_qh + token[:, None] * stride_qt
                + d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    # output, logits and row statistics are indexed by the row's place in [B, Hq * T]
    flat_row = (b * kv_heads + kv_head) * rows + r

    start = pid_s * slots_per_split
    end = tl.minimum(start + slots_per_split, capacity)
    k_base = k_ptr + b * stride_kb + kv_head * stride_kh
    v_base = v_ptr + b * stride_vb + kv_head * stride_vh
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for c0 in range(start, end, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < end
        kv_mask = c_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + c[:, None] * stride_kc + d[None, :] * stride_kd, mask=kv_mask, other=0.0).to(q.dtype)
        if IEEE_DOT:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = (s * scale_log2).to(tl.float32)  # Inductor passes Python floats as fp64 scalars
        if SCALED:
            k_scale = tl.load(ks_ptr + b * stride_ksb + kv_head * stride_ksh + c * stride_ksc, mask=c_ok, other=0.0)
            s = s * k_scale[None, :]
        pos = tl.load(pos_ptr + b * stride_pb + kv_head * stride_ph + c * stride_pc, mask=c_ok, other=-1)
        s = tl.where((pos >= 0)[None, :], s, FREE_SLOT_LOGIT)
        s = tl.where(c_ok[None, :], s, float("-inf"))
        if NEED_WEIGHT:
            tl.store(logit_ptr + flat_row[:, None] * logit_stride + c[None, :], s,
                     mask=row_ok[:, None] & c_ok[None, :])
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + c[:, None] * stride_vc + d[None, :] * stride_vd, mask=kv_mask, other=0.0).to(q.dtype)
        p_v = p
        if SCALED:
            v_scale = tl.load(vs_ptr + b * stride_vsb + kv_head * stride_vsh + c * stride_vsc, mask=c_ok, other=0.0)
            p_v = p * v_scale[None, :]
        if IEEE_DOT:
            pv = tl.dot(p_v.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p_v.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if SPLITS == 1:
        out = acc / l_i[:, None]
        tl.store(out_ptr + flat_row[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])
        if NEED_WEIGHT:
            tl.store(row_ml_ptr + flat_row * 2, m_i, mask=row_ok)
            tl.store(row_ml_ptr + flat_row * 2 + 1, l_i, mask=row_ok)
    else:
        part = flat_row * SPLITS + pid_s
        tl.store(part_acc_ptr + part[:, None] * D + d[None, :], acc, mask=row_ok[:, None] & d_ok[None, :])
        tl.store(part_ml_ptr + part * 2, m_i, mask=row_ok)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_ok)


@triton.jit
def _combine_kernel(part_acc_ptr, part_ml_ptr, out_ptr, row_ml_ptr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                    SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, NEED_WEIGHT: tl.constexpr):
    row = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    s_ok = s < SPLITS
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D
    m = tl.load(part_ml_ptr + (row * SPLITS + s) * 2, mask=s_ok, other=float("-inf"))
    l_part = tl.load(part_ml_ptr + (row * SPLITS + s) * 2 + 1, mask=s_ok, other=0.0)
    m_row = tl.max(m, axis=0)
    w = tl.exp2(m - m_row)
    l_row = tl.sum(l_part * w, axis=0)
    acc = tl.load(part_acc_ptr + (row * SPLITS + s)[:, None] * D + d[None, :], mask=s_ok[:, None] & d_ok[None, :],
                  other=0.0)
    out = tl.sum(acc * w[:, None], axis=0) / l_row
    tl.store(out_ptr + row * D + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)
    if NEED_WEIGHT:
        tl.store(row_ml_ptr + row * 2, m_row)
        tl.store(row_ml_ptr + row * 2 + 1, l_row)


@triton.jit
def _weight_kernel(logit_ptr, row_ml_ptr, weight_ptr, capacity, logit_stride, rows, inv_q_heads,
                   BLOCK_W: tl.constexpr, BLOCK_RW: tl.constexpr):
    b = tl.program_id(0)  # a sequence, or a (sequence, KV head) for per-head weights: `rows` consecutive rows each
    c = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    c_ok = c < capacity
    total = tl.zeros([BLOCK_W], tl.float32)
    for r0 in range(0, rows, BLOCK_RW):
        r = r0 + tl.arange(0, BLOCK_RW)
        r_ok = r < rows
        flat_row = b * rows + r
        m = tl.load(row_ml_ptr + flat_row * 2, mask=r_ok, other=0.0)
        inv_l = 1.0 / tl.load(row_ml_ptr + flat_row * 2 + 1, mask=r_ok, other=1.0)
        s = tl.load(logit_ptr + flat_row[:, None] * logit_stride + c[None, :], mask=r_ok[:, None] & c_ok[None, :],
                    other=float("-inf"))
        total += tl.sum(tl.exp2(s - m[:, None]) * inv_l[:, None], axis=0)
    tl.store(weight_ptr + b * capacity + c, (total * inv_q_heads).to(tl.float32), mask=c_ok)


def _scratch(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """An fp32 buffer of `shape`, or a one-element one if `shape` is empty (Triton takes no null pointer)."""
    return torch.empty(shape if shape[0] else (1,), dtype=torch.float32, device=device)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda" or not torch.cuda.is_available():
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_count(programs: int, capacity: int, device: torch.device, block_c: int = BLOCK_C) -> int:
    """Slot ranges per (KV head, row block): enough programs to fill the GPU, each at least one tile long."""
    tiles = triton.cdiv(capacity, block_c)
    wanted = triton.cdiv(PROGRAMS_PER_SM * _multiprocessors(device), programs)
    return max(1, min(tiles, wanted))


def launch_slot_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_pos: torch.Tensor,
                          scale: float, need_weight: bool, k_scale: torch.Tensor | None = None,
                          v_scale: torch.Tensor | None = None, *, splits: int | None = None,
                          block_c: int = BLOCK_C, num_warps: int = 4,
                          num_stages: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the kernels; returns `(out [B, Hq, T, D] contiguous, slot_weight [B, C] fp32 (`[B, Hkv, C]` for per-head
    `slot_pos`), or [B, 0] without weights)`. `k_scale`, `v_scale` (`[B, Hkv, C, 1]` fp32) go with int8 slots.
    Keyword-only arguments override the launch heuristics (tests and the kernel benchmark use them)."""
    scaled = k_scale is not None
    if scaled != (v_scale is not None):
        raise ValueError("slot attention takes key and value scales together")
    batch, q_heads, q_len, head_dim = q.shape
    if q_len != 1:
        raise ValueError(f"the fused slot attention takes one query per head (a decode step), got {q_len}: several "
                         "queries are a chunk, causal by slot position, which the reference implementation applies")
    kv_heads, capacity = k_cache.shape[1], k_cache.shape[2]
    rows = (q_heads // kv_heads) * q_len
    block_r = min(MAX_BLOCK_R, max(MIN_BLOCK_R, triton.next_power_of_2(rows)))
    row_blocks = triton.cdiv(rows, block_r)
    if splits is None:
        splits = split_count(batch * kv_heads * row_blocks, capacity, q.device, block_c)
    tiles_per_split = triton.cdiv(triton.cdiv(capacity, block_c), splits)
    slots_per_split = tiles_per_split * block_c
    splits = triton.cdiv(capacity, slots_per_split)  # no empty split
    block_d = triton.next_power_of_2(head_dim)
    flat_rows = batch * q_heads * q_len

    out = torch.empty((batch, q_heads, q_len, head_dim), dtype=q.dtype, device=q.device)
    logit_stride = triton.cdiv(capacity, LOGIT_ROW_ALIGN) * LOGIT_ROW_ALIGN
    # scratch buffers; a one-element stand-in where the kernel's constexpr flags leave one unused
    weight_rows = flat_rows if need_weight else 0
    logits = _scratch((weight_rows, logit_stride), q.device)
    row_ml = _scratch((weight_rows, 2), q.device)
    part_rows = flat_rows if splits > 1 else 0
    part_acc = _scratch((part_rows, splits, head_dim), q.device)
    part_ml = _scratch((part_rows, splits, 2), q.device)

    # unscaled slots pass stand-ins the SCALED=False kernel never reads, each its own tensor: under
    # functionalization every argument a kernel may write gets its own copy and the last copy replaces the tensor,
    # so a tensor passed twice (here once written) loses the write whenever the mutation analysis cannot rule the
    # other argument out (`tests/test_slot_attention_kernel.py`)
    k_scales = k_scale if scaled else _scratch((0,), q.device)
    v_scales = v_scale if scaled else _scratch((0,), q.device)
    scale_strides = (*k_scale.stride()[:3], *v_scale.stride()[:3]) if scaled else (0,) * 6
    per_head = slot_pos.dim() == 3
    pos_strides = slot_pos.stride() if per_head else (slot_pos.stride(0), 0, slot_pos.stride(1))
    wrap_triton(_split_kernel)[(batch * kv_heads, row_blocks, splits)](
        q, k_cache, v_cache, slot_pos, out, part_acc, part_ml, logits, row_ml, k_scales, v_scales,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *pos_strides, *scale_strides,
        scale * LOG2E, kv_heads, capacity, logit_stride, q_len, rows, slots_per_split,
        D=head_dim, BLOCK_D=block_d, BLOCK_R=block_r, BLOCK_C=block_c, SPLITS=splits, NEED_WEIGHT=need_weight,
        IEEE_DOT=q.dtype == torch.float32, SCALED=scaled, num_warps=num_warps, num_stages=num_stages)
    if splits > 1:
        wrap_triton(_combine_kernel)[(flat_rows,)](
            part_acc, part_ml, out, row_ml, D=head_dim, BLOCK_D=block_d, SPLITS=splits,
            BLOCK_S=triton.next_power_of_2(splits), NEED_WEIGHT=need_weight, num_warps=4)
    if not need_weight:
        return out, q.new_empty((batch, 0), dtype=torch.float32)
    weight_heads = kv_heads if per_head else 1
    slot_weight = torch.empty(tuple(slot_pos.shape), dtype=torch.float32, device=q.device)
    wrap_triton(_weight_kernel)[(batch * weight_heads, triton.cdiv(capacity, 128))](
        logits, row_ml, slot_weight, capacity, logit_stride, q_heads * q_len // weight_heads,
        weight_heads / q_heads, BLOCK_W=128, BLOCK_RW=32, num_warps=4)
    return out, slot_weight


@triton_op("hae::slot_attention_fused", mutates_args=())
def slot_attention_fused(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_pos: torch.Tensor,
                         scale: float, need_weight: bool, k_scale: torch.Tensor | None = None,
                         v_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`hae::slot_attention` (and, with `need_weight=False`, `hae::slot_attention_no_weight`) in one streaming
    pass over the slots. The second output is `[B, C]` fp32 (`[B, Hkv, C]` for per-head `slot_pos`) with weights,
    `[B, 0]` without."""
    return launch_slot_attention(q, k_cache, v_cache, slot_pos, scale, need_weight, k_scale, v_scale)
