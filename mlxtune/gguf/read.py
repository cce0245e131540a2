"""Read a Llama / Qwen2 GGUF file: its header (bounded), Hugging Face weight names and a config.json dict.

    header = read_header("model.gguf")          # metadata + tensor table, no tensor data; never trusts a count
    config = header_config("model.gguf")        # config.json dict from the header alone (memory estimates)
    contents = read_gguf("model.gguf", dtype="float32")   # config, HF-named weights, metadata
    contents = read_stored("model.gguf")        # the same before any dtype cast (the loader fingerprints this)

The header is parsed here, from a memory map, with every count, string length, array length and tensor extent
checked against the file size first, so a corrupt or lying header is one ModelLoadError naming the file (never a
huge allocation or a crash in a native reader); the tensor data are then read with
`mx.load(path, return_metadata=True)`, which returns F32/F16 tensors as arrays and Q4_0/Q4_1/Q8_0 tensors as MLX
affine-quantized triples (`name.weight` uint32, `name.scales`, `name.biases`, group size 32). Those are
dequantized in float32 (bit-exact with llama.cpp's own gguf-py), or, with `keep_quantized=True`, kept as triples
for `nn.QuantizedLinear` (QLoRA on the file's own quantization). Other tensor types (K-quants, Q5_x, ...) that MLX
cannot read are dequantized with the `gguf` package (numpy; slower). MLX returns BF16 tensors as float16.

llama.cpp's converter permutes the rows of the Llama Q and K projections (its RoPE pairs adjacent dimensions,
Hugging Face's pairs halves); `unpermute_rows` undoes that. Qwen2 files are not permuted. The config.json dict
comes from the metadata (hfconfig.py), Llama 3's rope scaling from the `rope_freqs.weight` divisors.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import mlx.core as mx
import numpy as np

from ..errors import ModelLoadError
from ..quant import cast_floats, quantization_config
from .hfconfig import gguf_config, llama3_scaling_from_divisors

SUPPORTED_ARCHS = ("llama", "qwen2")
GROUP_SIZE = 32  # every GGUF block format MLX reads (Q4_0, Q4_1, Q8_0) has 32 weights per block
MAX_DIMS = 4  # ggml tensors have at most 4 dimensions

# Per-block tensor names: GGUF → Hugging Face (under `model.layers.N.`).
BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

PathLike = Union[str, Path]


# ---------------------------------------------------------------------------------------------------------
# The header


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table."""

    shape: tuple[int, ...]
    "Row-major (Hugging Face order): ggml's dims, which list the fastest first, reversed."
    ggml_type: int
    offset: int
    "Absolute byte offset of the data in the file."
    nbytes: int


@dataclass
class GGUFHeader:
    """A GGUF file's metadata and tensor table, every extent checked against the file size."""

    version: int
    metadata: dict
    "Key → Python value; arrays longer than read_header's `max_array` are left out."
    tensors: dict[str, TensorInfo]
    data_offset: int

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor name → logical (element) shape, row-major."""
        return {name: t.shape for name, t in self.tensors.items()}


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")
_SKIPPED = object()


class _Cursor:
    """Little-endian reads from a buffer; each read is checked against the bytes that are left."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.size, self.path = buf, 0, len(buf), path

    def fail(self, what: str) -> ModelLoadError:
        return ModelLoadError(f"{self.path}: the GGUF header is truncated or corrupt ({what}, in a file of "
                              f"{self.size} bytes); download the file again")

    def take(self, n: int, what: str) -> int:
        if n < 0 or n > self.size - self.pos:
            raise self.fail(f"{what} at byte {self.pos} runs past the end")
        start, self.pos = self.pos, self.pos + n
        return start

    def scalar(self, fmt: str, what: str):
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        start = self.take(n, what)
        return bytes(self.buf[start:start + n]).decode("utf-8", errors="replace")

    def skip_strings(self, n: int) -> None:
        """Step over `n` length-prefixed strings without decoding them (a vocabulary: ~10^5 of them)."""
        buf, pos, size, unpack = self.buf, self.pos, self.size, _U64.unpack_from
        for _ in range(n):
            if pos + 8 > size or pos + 8 + unpack(buf, pos)[0] > size:
                self.pos = pos
                raise self.fail(f"a metadata string at byte {pos} runs past the end")
            pos += 8 + unpack(buf, pos)[0]
        self.pos = pos

    def count(self, what: str, min_item_bytes: int) -> int:
        """A u64 count of items of at least `min_item_bytes` each, refused when they cannot fit in the file."""
        n = self.scalar("<Q", what)
        if n * min_item_bytes > self.size - self.pos:
            raise self.fail(f"{n} {what} cannot fit in the {self.size - self.pos} bytes left")
        return n


def _value(cur: _Cursor, vtype: int, max_array: Optional[int], depth: int = 0) -> Any:
    if vtype in _SCALARS:
        return cur.scalar(_SCALARS[vtype], "a metadata value")
    if vtype == _STRING:
        return cur.string("a metadata string")
    if vtype != _ARRAY or depth > 2:
        raise cur.fail(f"metadata value type {vtype}")
    etype = cur.scalar("<I", "an array type")
    size = struct.calcsize(_SCALARS[etype]) if etype in _SCALARS else 8 if etype == _STRING else 12
    n = cur.count("array elements", size)
    if etype in _SCALARS and (max_array is None or n <= max_array):
        start = cur.take(n * size, "an array")
        return list(struct.unpack_from(f"<{n}{_SCALARS[etype][1]}", cur.buf, start))
    if max_array is not None and n > max_array:  # token lists, merges: skipped, not decoded
        if etype in _SCALARS:
            cur.take(n * size, "an array")
        elif etype == _STRING:
            cur.skip_strings(n)
        else:
            for _ in range(n):
                _value(cur, etype, 0, depth + 1)
        return _SKIPPED
    return [_value(cur, etype, max_array, depth + 1) for _ in range(n)]


def _tensor_sizes() -> dict[int, tuple[int, int]]:
    """ggml type → (elements per block, bytes per block), from llama.cpp's gguf-py."""
    from gguf.constants import GGML_QUANT_SIZES

    return {int(k): v for k, v in GGML_QUANT_SIZES.items()}


def _tensor_table(cur: _Cursor, n_tensors: int) -> dict[str, tuple[tuple[int, ...], int, int, int]]:
    sizes = _tensor_sizes()
    table = {}
    for _ in range(n_tensors):
        name = cur.string("a tensor name")
        n_dims = cur.scalar("<I", "a tensor's dimension count")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions")
        dims = [cur.scalar("<Q", "a tensor dimension") for _ in range(n_dims)]
        if 0 in dims:
            raise cur.fail(f"tensor {name[:60]!r} has a dimension of 0")
        ttype, offset = cur.scalar("<I", "a tensor type"), cur.scalar("<Q", "a tensor offset")
        if ttype not in sizes:
            raise ModelLoadError(f"{cur.path}: tensor {name!r} has ggml type {ttype}, which this gguf package does "
                                 "not know; upgrade it (pip install -U gguf) or use a Q8_0/Q4_0/Q4_1/F16 file")
        block, type_size = sizes[ttype]
        if dims[0] % block:
            raise cur.fail(f"tensor {name!r}: a row of {dims[0]} is not whole blocks of {block}")
        table[name] = (tuple(reversed(dims)), ttype, offset, math.prod(dims) // block * type_size)
    return table


def read_header(path: PathLike, *, max_array: Optional[int] = 64) -> GGUFHeader:
    """The metadata and tensor table of a GGUF file, without reading tensor data.

    Arrays longer than `max_array` elements (token lists, merges) are skipped, not decoded (None: decode all),
    so a 128k-token vocabulary costs milliseconds. Every count, length and tensor extent is checked against the
    file size; anything that does not fit raises ModelLoadError naming the file ("truncated" when the tensor
    data end past the end of the file).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            if f.seek(0, 2) < 4:  # (an empty file cannot be mapped)
                raise ModelLoadError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse_header(buf, path, max_array)
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read ({e.strerror or e})") from None


def _parse_header(buf, path: Path, max_array: Optional[int]) -> GGUFHeader:
    if buf[:4] != b"GGUF":
        raise ModelLoadError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
    cur = _Cursor(buf, path)
    cur.take(4, "the magic")
    version = cur.scalar("<I", "the version")
    if version not in (2, 3):
        raise ModelLoadError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    n_tensors = cur.count("tensors", 32)
    n_kv = cur.count("metadata entries", 13)
    metadata = {}
    for _ in range(n_kv):
        key = cur.string("a metadata key")
        value = _value(cur, cur.scalar("<I", "a metadata type"), max_array)
        if value is not _SKIPPED:
            metadata[key] = value
    table = _tensor_table(cur, n_tensors)
    align = metadata.get("general.alignment", 32)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise cur.fail(f"general.alignment is {align!r}")
    data_offset = -(-cur.pos // align) * align
    tensors = {}
    previous_end, previous = 0, None
    for name, (shape, ttype, offset, nbytes) in sorted(table.items(), key=lambda kv: kv[1][2]):
        end = data_offset + offset + nbytes
        if end > cur.size:
            raise ModelLoadError(f"{path}: the GGUF file is truncated (tensor {name[:60]!r} ends at byte {end}, past "
                                 f"the end of the {cur.size}-byte file); download it again")
        if offset % align or offset < previous_end:  # misplaced data would load as garbage weights
            why = f"is not a multiple of the alignment {align}" if offset % align else f"overlaps tensor {previous[:60]!r}"
            raise cur.fail(f"tensor {name[:60]!r}: its data offset {offset} {why}")
        previous_end, previous = offset + nbytes, name
        tensors[name] = TensorInfo(shape, ttype, data_offset + offset, nbytes)
    return GGUFHeader(version=version, metadata=metadata, tensors=tensors, data_offset=data_offset)


def check_arch(metadata: dict, path: PathLike) -> str:
    """The file's architecture, or ModelLoadError when mlxtune does not read it."""
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ModelLoadError(
            f"{path}: GGUF architecture {arch!r} is not supported; mlxtune reads {', '.join(SUPPORTED_ARCHS)} "
            "(Llama 3.x, Qwen2/2.5) GGUF files"
        )
    return arch


def header_config(path: PathLike) -> dict:
    """A config.json dict from the header alone (no tensor data; llama3 rope scaling is not recovered)."""
    header = read_header(path)
    check_arch(header.metadata, path)
    return gguf_config(header.metadata, header.shapes, path)


# ---------------------------------------------------------------------------------------------------------
# Names, permutation, dtype


def hf_name(gguf_name: str) -> Optional[str]:
    """`blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`; None for names with no HF match."""
    base, _, kind = gguf_name.rpartition(".")
    if kind not in ("weight", "bias"):
        return None
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if m and m.group(2) in BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{BLOCK_NAMES[m.group(2)]}.{kind}"
    if base in TOP_NAMES:
        return f"{TOP_NAMES[base]}.{kind}"
    return None


def unpermute_rows(w: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's Q/K row permutation: rows (H*hd, ...) as (H, hd/2, 2) → (H, 2, hd/2).

    Works on a weight (out, in), a bias (out,) and on the rows of quantized triples (weight, scales, biases
    are all row-major in the output dimension, and quantization groups run along the input dimension).
    """
    rows = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


def default_dtype() -> str:
    """float16 where MLX has a GPU, float32 on the CPU (bf16/f16 matmuls are slow on CPUs)."""
    return "float32" if mx.default_device().type == mx.DeviceType.cpu else "float16"


# ---------------------------------------------------------------------------------------------------------
# Tensors


@dataclass
class GGUFContents:
    """What a GGUF file holds, in Hugging Face terms."""

    config: dict
    "A config.json dict (model_type, sizes, rope, tie_word_embeddings, bos/eos ids)."
    weights: dict
    "Hugging Face names → arrays; unknown GGUF tensors keep their GGUF name (the loader reports them)."
    quantization: Optional[dict] = None
    "With keep_quantized: mlx-lm style {'group_size': 32, 'bits': b, '<module path>': {...}} for kept triples."
    metadata: dict = field(default_factory=dict)
    "The GGUF metadata as plain Python values (token lists included)."


def read_gguf(path: PathLike, dtype: Optional[str] = None, keep_quantized: bool = False) -> GGUFContents:
    """Read a llama / qwen2 GGUF: config dict, HF-named weights (dequantized unless keep_quantized), metadata.

    dtype: "float32", "bfloat16" or "float16" for every float tensor; None: `default_dtype()`.
    keep_quantized: keep Q4_0/Q4_1/Q8_0 tensors as MLX affine triples (group 32); others are dequantized.
    """
    contents = read_stored(path, keep_quantized=keep_quantized)
    contents.weights = cast_floats(contents.weights, dtype or default_dtype())
    return contents


def read_stored(path: PathLike, keep_quantized: bool = False) -> GGUFContents:
    """`read_gguf` before the dtype cast: F32/F16 tensors as stored, dequantized blocks in float32, kept triples
    with float32 scales and biases (exact). What the file holds, whatever dtype it is loaded in."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such GGUF file")
    header = read_header(path)  # validates every extent before a native reader sees the file
    arch = check_arch(header.metadata, path)
    raw, metadata = _read_tensors(path)
    triples = _group_triples(raw)
    config = gguf_config(metadata, header.shapes, path)
    rope_freqs = raw.pop("rope_freqs.weight", None)
    if rope_freqs is not None:
        config["rope_scaling"] = llama3_scaling_from_divisors(np.array(rope_freqs.astype(mx.float32)), config, path)

    heads = {".self_attn.q_proj.": config["num_attention_heads"], ".self_attn.k_proj.": config["num_key_value_heads"]}

    def heads_for(name: str) -> Optional[int]:
        if arch != "llama":  # llama.cpp permutes Q/K for LlamaModel only
            return None
        return next((h for part, h in heads.items() if part in name), None)

    for gname in list(raw) + list(triples):  # the header's head counts must split the Q/K rows they permute
        h, rows = heads_for(hf_name(gname) or gname), (raw.get(gname) if gname in raw else triples[gname][0]).shape[0]
        if h and rows % (2 * h):
            raise ModelLoadError(f"{path}: tensor {gname[:60]!r} has {rows} rows, which {h} attention heads cannot "
                                 "split: the header's head counts do not match the weights")
    weights: dict[str, mx.array] = {}
    per_module: dict[str, dict] = {}
    for gname, arr in raw.items():
        name = hf_name(gname) or gname
        h = heads_for(name)
        weights[name] = unpermute_rows(arr, h) if h else arr
    for gname, (w, scales, biases) in triples.items():
        name = hf_name(gname) or gname
        bits = w.shape[-1] // scales.shape[-1]
        scales, biases = scales.astype(mx.float32), biases.astype(mx.float32)
        h = heads_for(name)
        if h:
            w, scales, biases = (unpermute_rows(a, h) for a in (w, scales, biases))
        if keep_quantized and name.endswith(".weight"):
            module = name[: -len(".weight")]
            weights.update({name: w, f"{module}.scales": scales, f"{module}.biases": biases})
            per_module[module] = {"group_size": GROUP_SIZE, "bits": bits}
        else:
            weights[name] = mx.dequantize(w, scales, biases, group_size=GROUP_SIZE, bits=bits)
    return GGUFContents(config=config, weights=weights, quantization=quantization_config(per_module) or None,
                        metadata=metadata)


def _group_triples(raw: dict) -> dict[str, tuple[mx.array, mx.array, mx.array]]:
    """Pop MLX's quantized triples out of `raw`: `x.weight` (or `x`) with `x.scales` / `x.biases`."""
    triples = {}
    for key in [k for k in raw if k.endswith(".scales")]:
        base = key[: -len(".scales")]
        wkey = base + ".weight" if base + ".weight" in raw else base
        triples[wkey] = (raw.pop(wkey), raw.pop(key), raw.pop(base + ".biases"))
    return triples


def _plain(value: Any) -> Any:
    """mx.load's metadata values → Python: 0-d arrays → scalars, 1-d arrays → lists."""
    if isinstance(value, mx.array):
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def _read_tensors(path: Path) -> tuple[dict, dict]:
    """(tensors, metadata): with MLX when it can read every tensor type, else with the gguf package."""
    try:
        raw, metadata = mx.load(str(path), return_metadata=True)
    except Exception:  # MLX reads F32/F16/BF16/Q4_0/Q4_1/Q8_0 only; the header was checked already
        return _read_with_gguf_py(path)  # another tensor type (K-quants, Q5_x, ...)
    return dict(raw), {k: _plain(v) for k, v in metadata.items()}


def _read_with_gguf_py(path: Path) -> tuple[dict, dict]:
    """Fallback for tensor types MLX cannot read: dequantize everything to float32 with llama.cpp's gguf-py."""
    try:
        from gguf import GGUFReader
        from gguf.quants import dequantize
    except ImportError:
        raise ModelLoadError(
            f"{path}: this GGUF uses a tensor type MLX cannot read (e.g. Q4_K, Q6_K); install the `gguf` package "
            "to dequantize it, or use a Q8_0/Q4_0/Q4_1/F16 file"
        ) from None
    try:
        reader = GGUFReader(str(path))
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot read this GGUF file ({e}); it may be truncated — download it again") from None
    metadata = {}
    for name, fld in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        value = fld.contents()
        metadata[name] = value.item() if isinstance(value, np.generic) else value
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # ggml lists dims fastest-first
        data = dequantize(t.data, t.tensor_type).reshape(shape)
        tensors[t.name] = mx.array(np.ascontiguousarray(data, dtype=np.float32))
    return tensors, metadata
