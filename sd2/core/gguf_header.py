"""A GGUF file's header, read without loading any tensor: its architecture (can transformers load
it?), its layer count (is a layer-pruning request possible?), the Hub repo it came from and its
license (how a published card names the target). Used by `sd2 validate` before any model loads."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from sd2.core.errors import reading

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")   # a Hub repo id, org/name
_HF_URL = re.compile(r"^https?://(?:www\.)?huggingface\.co/([A-Za-z0-9][\w.\-]*/[\w.\-]+?)/?$")


@dataclass(frozen=True)
class GgufInfo:
    """What a GGUF file's header says, read without loading any tensor (gguf-py's GGUFReader)."""

    path: Path
    architecture: str | None   # general.architecture, e.g. "llama"
    layers: int | None         # <architecture>.block_count
    hub_id: str | None         # the Hub repo it was converted from, when the header names one
    license: str | None = None  # general.license


def gguf_info(path: Path) -> GgufInfo:
    """The header of a GGUF file. The Hub id comes from ``general.source.huggingface.repository``,
    a huggingface.co ``general.source.url``, or else the single ``general.base_model.0.repo_url``
    (the GGUF spec's provenance keys); converters often write none of them, and then it is None."""
    with reading(f"the GGUF file {path}", "a GGUF model file (llama.cpp's format, magic 'GGUF')",
                 "check the file is complete (re-download it) and really a .gguf"):
        fields = read_header(Path(path))

    arch = fields.get("general.architecture")
    arch = str(arch) if arch is not None else None
    layers = fields.get(f"{arch}.block_count") if arch else None
    hub = None
    for key in ("general.source.huggingface.repository", "general.source.url", "general.base_model.0.repo_url"):
        value = str(fields.get(key) or "")
        m = _HF_URL.match(value)
        hub = m.group(1) if m else (value if HUB_ID.match(value) else None)
        if hub:
            break
    if hub and fields.get("general.base_model.count") not in (None, 1) and key.startswith("general.base_model"):
        hub = None  # several base models: none of them is "the" source
    lic = fields.get("general.license")
    return GgufInfo(Path(path), arch, layers if isinstance(layers, int) else None, hub,
                    str(lic) if lic is not None else None)


def read_header(path: Path) -> dict:
    """The scalar and string key-values of a GGUF header (GGUF spec v2/v3, either byte order);
    array values are skipped and read as None.

    Why not gguf's GGUFReader: it parses every field into numpy memmap views, one per tokenizer
    string, which took 5.9 s on SmolLM2-135M's 100 MB file (49k tokens; 2-core Xeon) where this
    needs a handful of scalars. The value type codes are the gguf package's (GGUFValueType)."""
    import mmap
    import struct

    from gguf import GGUFValueType as T

    scalar = {T.UINT8: "B", T.INT8: "b", T.UINT16: "H", T.INT16: "h", T.UINT32: "I", T.INT32: "i",
              T.FLOAT32: "f", T.BOOL: "?", T.UINT64: "Q", T.INT64: "q", T.FLOAT64: "d"}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"the file starts with {bytes(buf[:4])!r}, not the GGUF magic")
        order = "<" if struct.unpack_from("<I", buf, 4)[0] < 0x10000 else ">"
        pos = 8

        def take(fmt):
            nonlocal pos
            value = struct.unpack_from(order + fmt, buf, pos)[0]
            pos += struct.calcsize(order + fmt)
            return value

        def text():
            nonlocal pos
            n = take("Q")
            if pos + n > len(buf):
                raise ValueError("a string runs past the end of the file (a truncated file?)")
            pos += n
            return bytes(buf[pos - n:pos]).decode("utf-8", errors="replace")

        def value(kind):
            nonlocal pos
            if kind == T.STRING:
                return text()
            if kind == T.ARRAY:
                inner, n = T(take("I")), take("Q")
                if inner in scalar:
                    pos += n * struct.calcsize(scalar[inner])
                else:
                    for _ in range(n):
                        value(inner)
                return None
            return take(scalar[T(kind)])

        _tensors, n_kv = take("Q"), take("Q")
        fields = {}
        for _ in range(n_kv):
            key = text()
            fields[key] = value(T(take("I")))
        return fields


def gguf_problem(info: GgufInfo) -> str | None:
    """Why transformers cannot load this GGUF, or None. transformers renames a few llama.cpp
    architectures before its own check (qwen2moe -> qwen2_moe, gpt-oss -> gpt_oss, t5encoder -> t5, ...);
    the same renames are applied here so that nothing it loads is refused."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING   # importing it does not import torch

    if info.architecture is None:
        return (f"{info.path} has no general.architecture in its header; expected a GGUF model file written by "
                f"llama.cpp's converter")
    supported = set(GGUF_CONFIG_MAPPING) - {"general", "tokenizer"}   # the architectures its GGUF loader reads
    arch = info.architecture
    names = {arch, arch.replace("-", "_"), arch.replace("moe", "_moe"), "t5" if "t5" in arch else arch}
    if names & supported:
        return None
    return (f"{info.path} is a GGUF of architecture '{arch}', which transformers cannot load (its GGUF loader "
            f"supports: {', '.join(sorted(supported))}). Use a GGUF of one of those architectures, or the model's "
            f"safetensors folder (`path:`) or Hub id (`hub:`)")
