"""MXFP4 (OCP microscaling, FP4 E2M1 elements + E8M0 shared scale) for GPT-OSS.

Layout in the openai/gpt-oss checkpoints (and what this module reads/writes):
  ``blocks`` uint8 ``[..., G, 16]``: 32 FP4 codes per group, two per byte,
  element ``2j`` in the LOW nibble of byte ``j`` and element ``2j+1`` in the
  high nibble; ``scales`` uint8 ``[..., G]``: E8M0, value ``2**(scale - 127)``.
  Dequantized rows are ``[..., G*32]`` in file orientation (``[E, out, in]``
  for the experts); transformers' GptOssExperts parameters are the transpose
  of that (``gate_up_proj [E, hidden, 2*inter]``), the caller transposes.

Bit-exactness with transformers: its dequantizer looks the code up in a
table of the target dtype and then applies ``torch.ldexp(value, scale-127)``
in that dtype. That is a true ldexp (``0 * 2**128`` stays 0 rather than NaN,
overflow gives +-inf), so instead of re-deriving its corner cases we build a
``[256 scales x 256 bytes x 2]`` table with the very same ldexp call once per
dtype and then dequantize by pure table lookup. Because dequantization is an
elementwise function of (byte, scale), the test comparing every one of the
65,536 combinations with transformers proves equality for all inputs. The
lookup (one ``index_select`` writing straight into the output) is also ~9x
faster on CPU than transformers' two strided gathers plus ldexp.

Canonical ("valid") encodings, for which ``quantize(dequantize(b, s)) == (b, s)``
holds exactly when dequantizing to float32 or bfloat16:
  * a group whose 32 codes are all +-0 (codes 0 / 8) must have scale byte 0
    (its values do not depend on the scale, so the scale cannot be recovered;
    0 is what the OCP rule and OpenAI's own quantizer give for amax == 0);
  * any other group must contain at least one code of magnitude 4 or 6
    (codes 6, 7, 14, 15) and have a scale byte <= 252 (253+ overflows: 4*2**126
    is already inf in fp32/bf16; 255 is E8M0 NaN).
The sign of zero is kept (-0 is code 8), so zeros of either sign round-trip.
Groups outside that set (e.g. largest code 3 under the same scale) still
quantize to the same *values*, only with a different, canonical encoding.

Quantization of arbitrary tensors follows the OCP MX spec v1.0: shared
exponent ``floor(log2(amax)) - 2`` (emax of E2M1 is 2) clamped to E8M0's
[-127, 127], elements divided by the scale and rounded to nearest, ties to
even, onto the E2M1 grid, saturating at +-6.

Memory: both directions process a bounded number of groups at a time
(``max_chunk_bytes`` of temporaries), so converting one 20B expert tensor
(32 x 5760 x 90 x 16 bytes of blocks) needs little beyond its output.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "FP4_VALUES",
    "MXFP4_BLOCKS_SUFFIX",
    "MXFP4_SCALES_SUFFIX",
    "canonical_mask",
    "dequantize",
    "quantize",
    "is_mxfp4_blocks",
    "is_mxfp4_scales",
    "is_mxfp4_pair",
    "logical_name",
    "mxfp4_pair_names",
    "group_mxfp4_names",
    "mxfp4_nbytes",
]

# E2M1 code -> value; bit 3 is the sign, so code 8 is -0.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
SCALE_BIAS = 127
GROUP = 32  # values per scale
BLOCK_BYTES = GROUP // 2
# 4 MiB of temporaries per chunk: fastest measured on CPU (2-4 MiB stay in cache;
# 1 MiB loses to per-chunk overhead, 16+ MiB to memory traffic).
DEFAULT_MAX_CHUNK_BYTES = 4 << 20

MXFP4_BLOCKS_SUFFIX = "_blocks"
MXFP4_SCALES_SUFFIX = "_scales"

_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[65536, 2] table: row ``scale*256 + byte`` -> (low-nibble value, high-nibble value)."""
    table = _TABLES.get((dtype, device))
    if table is None:
        lut = torch.tensor(FP4_VALUES, dtype=dtype)
        byte = torch.arange(256)
        pairs = torch.stack([lut[byte & 0x0F], lut[byte >> 4]], dim=-1)  # [256, 2]
        pairs = pairs.unsqueeze(0).expand(256, 256, 2).contiguous()
        # Same op, dtypes and exponent type (int32, scale - 127) as transformers.
        exps = (torch.arange(256, dtype=torch.int32) - SCALE_BIAS).view(256, 1, 1).expand(256, 256, 2)
        table = torch.ldexp(pairs, exps).reshape(256 * 256, 2).contiguous().to(device)
        _TABLES[(dtype, device)] = table
    return table


def _rows(t: torch.Tensor, tail: int) -> torch.Tensor | None:
    """View ``t`` as [N, *last `tail` dims] without copying, or None if impossible.

    Always succeeds when ``t`` has at most ``tail + 1`` dims, so the recursion
    over leading dims in the callers terminates."""
    try:
        return t.view(-1, *t.shape[t.dim() - tail :])
    except RuntimeError:
        return None


def dequantize(
    blocks: torch.Tensor,
    scales: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
    *,
    out: torch.Tensor | None = None,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
) -> torch.Tensor:
    """MXFP4 ``blocks [..., G, 16]`` + ``scales [..., G]`` -> ``[..., G*32]`` of ``dtype``.

    Rows stay as stored (no transpose). Bit-identical to transformers'
    ``convert_moe_packed_tensors`` (before its final transpose). ``out`` may be
    given to fill a preallocated tensor, also a strided view such as
    ``hf_param.transpose(-1, -2)`` (then rows land directly in HF layout).
    Peak extra memory is about ``max_chunk_bytes`` (at least one row of G groups).
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"blocks/scales must be uint8, got {blocks.dtype}/{scales.dtype}")
    if blocks.dim() < 2 or blocks.shape[-1] != BLOCK_BYTES or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"bad MXFP4 shapes: blocks {tuple(blocks.shape)}, scales {tuple(scales.shape)}")
    if blocks.device != scales.device:
        raise ValueError("blocks and scales on different devices")
    shape = (*blocks.shape[:-2], blocks.shape[-2] * GROUP)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=blocks.device)
    elif out.shape != shape or out.dtype != dtype:
        raise ValueError(f"out must be {shape} {dtype}, got {tuple(out.shape)} {out.dtype}")
    if out.numel():
        _dequantize_into(blocks, scales, out, _table(dtype, blocks.device), max_chunk_bytes)
    return out


def _dequantize_into(blocks, scales, out, table, max_chunk_bytes):
    # Work on logical rows [N, G*32]; each row has G groups.
    b3, s2, o2 = _rows(blocks, 2), _rows(scales, 1), _rows(out, 1)
    if b3 is None or s2 is None or o2 is None:
        # Not flattenable without a full copy (e.g. ``out`` is a transposed view
        # of an HF-layout buffer): recurse over the leading dim, memory stays bounded.
        for i in range(blocks.shape[0]):
            _dequantize_into(blocks[i], scales[i], out[i], table, max_chunk_bytes)
        return
    n, g = s2.shape
    if table.element_size() == 2 and o2.is_contiguous() and o2.storage_offset() % 2 == 0:
        _dequantize_packed(b3, s2, o2, table)
        return
    # per group: 16 int64 indices + the int64 scale term
    step = max(1, max_chunk_bytes // (g * (BLOCK_BYTES * 8 + 8)))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        idx = b3[r0:r1].long()
        idx += (s2[r0:r1].long() << 8).unsqueeze(-1)
        dst = o2[r0:r1]
        if dst.is_contiguous():  # the common case: write straight into the output
            torch.index_select(table, 0, idx.view(-1), out=dst.view(-1, 2))
        else:
            dst.copy_(torch.index_select(table, 0, idx.view(-1)).view(r1 - r0, -1))


# bf16/fp16: both values of a byte fit one int32, so one gather per byte instead of a
# [.., 2] row gather; with ~384 KiB of int32 indices per step (they stay in L2), this
# measured 3x faster than the row gather for gpt-oss-20b's experts.
_PACKED_INDEX_BYTES = 384 << 10


def _dequantize_packed(b3, s2, o2, table):
    packed = table.view(torch.int32).view(-1)  # [65536]: (low, high) nibble values of one byte
    out32 = o2.view(torch.int32)  # [N, G*16]
    n, g = s2.shape
    step = max(1, _PACKED_INDEX_BYTES // (g * BLOCK_BYTES * 4))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        idx = b3[r0:r1].to(torch.int32)
        idx += (s2[r0:r1].to(torch.int32) << 8).unsqueeze(-1)
        torch.index_select(packed, 0, idx.view(-1), out=out32[r0:r1].view(-1))


def quantize(
    x: torch.Tensor, *, max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [..., K]`` (K % 32 == 0, finite) -> (blocks ``[..., K/32, 16]``, scales ``[..., K/32]``).

    OCP MX scale choice and round-to-nearest-even with saturation (see module
    docstring); exact inverse of :func:`dequantize` on canonical encodings.
    Computation is in float32, so float64 input is first rounded to float32.
    ``x`` may be a non-contiguous view (e.g. a transposed weight): only one
    chunk at a time is copied.
    """
    if not x.is_floating_point():
        raise TypeError(f"quantize needs a floating tensor, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] % GROUP:
        raise ValueError(f"last dim must be a multiple of {GROUP}, got shape {tuple(x.shape)}")
    g = x.shape[-1] // GROUP
    blocks = torch.empty((*x.shape[:-1], g, BLOCK_BYTES), dtype=torch.uint8, device=x.device)
    scales = torch.empty((*x.shape[:-1], g), dtype=torch.uint8, device=x.device)
    if x.numel():
        _quantize_into(x, blocks, scales, max_chunk_bytes)
    return blocks, scales


def _quantize_into(x, blocks, scales, max_chunk_bytes):
    x2 = _rows(x, 1)
    if x2 is None:
        for i in range(x.shape[0]):
            _quantize_into(x[i], blocks[i], scales[i], max_chunk_bytes)
        return
    b3 = blocks.view(-1, *blocks.shape[-2:])
    s2 = scales.view(-1, scales.shape[-1])
    n, k = x2.shape
    if x2.dtype == torch.bfloat16:
        # ~10 bytes of temporaries per element; a few hundred KiB of them per step stay in cache
        step = max(1, _BF16_STEP_ELEMENTS // k)
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            _quantize_bf16_chunk(x2[r0:r1], b3[r0:r1], s2[r0:r1])
        return
    # ~16 bytes of temporaries per element (fp32 copy, scaled magnitudes, codes, masks)
    step = max(1, max_chunk_bytes // (16 * k))
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        b, s = _quantize_chunk(x2[r0:r1])
        b3[r0:r1] = b
        s2[r0:r1] = s


def _e2m1_codes(v: torch.Tensor, neg_k: torch.Tensor) -> torch.Tensor:
    """FP4 codes (uint8, sign in bit 3) of fp32 values `v` under the scale 2**-neg_k (broadcast)."""
    # Division by a power of two is exact in the range that matters: results are
    # < 8, and anything that underflows is far below the first rounding threshold.
    mag = torch.ldexp(v.abs(), neg_k)
    # Round to nearest, ties to even, onto 0,.5,1,1.5,2,3,4,6 (codes 0..7).
    # Strict '>' where the tie goes down to the even code, '>=' where it goes up;
    # everything above 5 saturates at 6 (code 7).
    code = (mag > 0.25).to(torch.uint8)
    for thr, up in ((0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False)):
        code += (mag >= thr) if up else (mag > thr)
    code |= torch.signbit(v).to(torch.uint8) << 3  # keeps -0 as code 8
    return code


def _quantize_chunk(xc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r = xc.shape[0]
    v = xc.to(torch.float32).reshape(r, -1, GROUP)  # copies only this chunk
    amax = v.abs().amax(dim=-1)  # [r, G]
    if not torch.isfinite(amax).all():
        raise ValueError("quantize: input contains inf or NaN")
    # floor(log2(amax)) == frexp exponent - 1 (frexp handles fp32 subnormals).
    e = torch.frexp(amax).exponent - 1
    k = (e - 2).clamp(-SCALE_BIAS, SCALE_BIAS)
    k = torch.where(amax == 0, torch.full_like(k, -SCALE_BIAS), k)
    code = _e2m1_codes(v, (-k).unsqueeze(-1))
    blocks = code[..., 0::2] | (code[..., 1::2] << 4)
    return blocks, (k + SCALE_BIAS).to(torch.uint8)


# bf16 input: a value's FP4 code depends only on its 16 bits and the group's scale byte, so one
# table [256 scales x 65536 bf16 patterns] built with `_e2m1_codes` itself (equal to the general
# path by construction) replaces the float passes: abs and max on the bits, one gather. A group
# uses one 64 KiB row, so the table is cache-friendly. 4.6x faster per core than the float path.
_BF16_STEP_ELEMENTS = 368_640
_BF16_CODES: list[torch.Tensor] = []


def _bf16_code_table() -> torch.Tensor:
    if not _BF16_CODES:
        values = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).to(torch.float32)
        values = torch.where(torch.isfinite(values), values, torch.zeros_like(values))  # never looked up
        table = torch.empty(256, 65536, dtype=torch.uint8)
        for scale in range(256):
            table[scale] = _e2m1_codes(values, torch.tensor([SCALE_BIAS - scale], dtype=torch.int32))
        _BF16_CODES.append(table.view(-1))
    return _BF16_CODES[0]


def _quantize_bf16_chunk(xc: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> None:
    r = xc.shape[0]
    bits = xc.contiguous().view(torch.int16)
    magnitude = (bits & 0x7FFF).view(r, -1, GROUP)  # positive floats order as their bits do
    amax = magnitude.amax(dim=-1)
    if bool((amax >= 0x7F80).any()):  # exponent all ones: inf or NaN
        raise ValueError("quantize: input contains inf or NaN")
    # scale byte = floor(log2(amax)) - 2 + 127 = amax's exponent field - 2; a subnormal or zero amax
    # (field 0) gives the clamp at 0 (k = -127), as the float path does.
    scale = ((amax >> 7) - 2).clamp_(0, 2 * SCALE_BIAS)
    scales.copy_(scale)
    index = bits.view(torch.uint16).to(torch.int32).view(r, -1, GROUP)
    index += (scale.to(torch.int32) << 16).unsqueeze(-1)
    codes = torch.index_select(_bf16_code_table(), 0, index.view(-1)).view(torch.int16)
    # each int16 holds an (even, odd) pair of codes as (low, high) byte: low | high << 4 is the
    # low byte of c | c >> 4
    blocks.copy_((codes | (codes >> 4)).to(torch.uint8).view(r, -1, BLOCK_BYTES))


def canonical_mask(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Bool ``[..., G]``: which groups are canonical (round-trip exactly, see module doc)."""
    lo, hi = blocks & 0x07, (blocks >> 4) & 0x07  # magnitude codes
    top = torch.maximum(lo, hi).amax(dim=-1)
    zero = top == 0
    return torch.where(zero, scales == 0, (top >= 6) & (scales <= 252))


# ---- tensor-name helpers ---------------------------------------------------


def is_mxfp4_blocks(name: str) -> bool:
    return name.endswith(MXFP4_BLOCKS_SUFFIX)


def is_mxfp4_scales(name: str) -> bool:
    return name.endswith(MXFP4_SCALES_SUFFIX)


def is_mxfp4_pair(name: str) -> bool:
    """True for either half (``*_blocks`` / ``*_scales``) of an MXFP4 pair."""
    return is_mxfp4_blocks(name) or is_mxfp4_scales(name)


def logical_name(name: str) -> str:
    """``...gate_up_proj_blocks`` / ``..._scales`` -> ``...gate_up_proj``; other names unchanged."""
    for suffix in (MXFP4_BLOCKS_SUFFIX, MXFP4_SCALES_SUFFIX):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def mxfp4_pair_names(logical: str) -> tuple[str, str]:
    """``...down_proj`` -> (``...down_proj_blocks``, ``...down_proj_scales``)."""
    return logical + MXFP4_BLOCKS_SUFFIX, logical + MXFP4_SCALES_SUFFIX


def group_mxfp4_names(names) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """Split checkpoint tensor names into MXFP4 pairs and plain tensors.

    Returns ``({logical: (blocks_name, scales_name)}, [plain names])`` in
    input order; a blocks tensor without its scales (or vice versa) is an
    error, since dequantizing it is impossible.
    """
    names = list(names)
    present = set(names)
    pairs: dict[str, tuple[str, str]] = {}
    plain: list[str] = []
    for name in names:
        if not is_mxfp4_pair(name):
            plain.append(name)
            continue
        logical = logical_name(name)
        b, s = mxfp4_pair_names(logical)
        if b not in present or s not in present:
            raise ValueError(f"incomplete MXFP4 pair for {logical!r}: need both {b!r} and {s!r}")
        pairs.setdefault(logical, (b, s))
    return pairs, plain


def mxfp4_nbytes(shape_out_in: tuple[int, ...]) -> int:
    """Bytes of blocks + scales for a logical ``[..., K]`` tensor (for memory planning)."""
    n = math.prod(shape_out_in)
    return n // 2 + n // GROUP
