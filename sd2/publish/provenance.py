"""Where the published drafter's weights come from: its base model (a Hub id) and that base's license.

The base is the model the drafter's weights derive from: the target when the recipe derives the
drafter from it (``drafter: {derive: target}``), else the recipe's drafter. The license is read
offline, from what is on disk: a local folder's README front matter or config.json, a GGUF file's
``general.license``, or a Hub model's README in the local Hugging Face cache. Nothing found gives
``other``, with a note saying why, so that nobody publishes under a guessed license.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from sd2.core.gguf_header import HUB_ID, gguf_info
from sd2.core.paths import expand


@dataclass
class Provenance:
    base_model: str | None                  # a Hub id, or None when the base is not on the Hub
    license: str                            # an SPDX-like id as the Hub uses them, or "other"
    notes: list[str] = field(default_factory=list)
    target: str = "the target model"        # the target as a reader of the card can find it (never a local path)
    target_hub: str | None = None           # the target's Hub id, when known


def provenance(recipe: dict | None, model_dir: Path, target_ref: str | None) -> Provenance:
    notes: list[str] = []
    recipe = recipe or {}
    if recipe.get("target"):
        target_ref_dict = recipe["target"]
    elif target_ref:  # no recipe: the report's target ref
        target_ref_dict = {"path": target_ref} if Path(target_ref).exists() else {"hub": target_ref}
    else:
        target_ref_dict = {}
    if recipe.get("drafter") and not recipe["drafter"].get("derive"):
        base_ref, role = recipe["drafter"], "drafter"
    elif target_ref_dict:
        base_ref, role = target_ref_dict, "target"
    else:
        base_ref, role = {}, "base model"

    base_model = hub_id(base_ref)
    if base_model is None:
        what = _describe(base_ref) if base_ref else "unknown (no recipe.yaml next to the model)"
        notes.append(f"base_model is left out: the {role} the drafter derives from is {what}, not a known Hub id. "
                     f"Add `base_model: <hub id>` to the card's front matter by hand if you know it.")

    lic = _license_from_folder(model_dir)
    source = f"the drafter folder {Path(model_dir).name}"
    if lic is None and base_ref:
        lic, source = _license_from_ref(base_ref), f"the {role} {_describe(base_ref)}"
    if lic is None:
        notes.append("license: other. No license was found offline (README front matter, config.json, GGUF "
                     "general.license or the Hugging Face cache); set the base model's license by hand before "
                     "publishing widely.")
        lic = "other"
    else:
        notes.append(f"license '{lic}' inherited from {source}.")
    target_hub = hub_id(target_ref_dict)
    target = target_hub or (_describe(target_ref_dict) if target_ref_dict else "the target model")
    return Provenance(base_model, lic, notes, target, target_hub)


def hub_id(ref: dict) -> str | None:
    """The Hub id of a model reference: a ``hub:`` id, or the repo a GGUF's header says it was
    converted from (general.source.* / general.base_model.0.*; sd2.core.gguf_header.gguf_info)."""
    if ref.get("hub"):
        return ref["hub"] if HUB_ID.match(ref["hub"]) else None
    return _gguf_fact(ref, "hub_id")


def _gguf_fact(ref: dict, name: str):
    """``name`` (hub_id, license) from the header of a ``gguf:`` reference (sd2.core.gguf_header.gguf_info);
    None for another reference, or a GGUF file missing or unreadable (the card then names the file)."""
    if not ref.get("gguf"):
        return None
    try:
        from sd2.core.models import ModelRef, locate_gguf

        return getattr(gguf_info(locate_gguf(ModelRef(**{k: v for k, v in ref.items() if k in ("gguf", "package")}))), name)
    except Exception:
        return None


def public_name(value: str) -> str:
    """A local path as a reader of the card may see it: its last part only (the rest names the
    publisher's folders and home directory). Anything else is returned unchanged."""
    text = str(value)
    if text.startswith(("/", "~", "./", "../")) or (len(text) > 2 and text[1] == ":" and text[2] in "/\\"):
        return Path(text).name or text
    return text


def _describe(ref: dict) -> str:
    """A model reference in words a reader can resolve, without local paths."""
    if ref.get("hub"):
        return f"the Hub model {ref['hub']}"
    if ref.get("gguf"):
        name = public_name(ref["gguf"])
        return (f"the GGUF file {name} of the Python package {ref['package']}" if ref.get("package")
                else f"the GGUF file {name}")
    if ref.get("path"):
        return f"a local model folder named {public_name(ref['path'])}"
    return "an unnamed model"


def _license_from_ref(ref: dict) -> str | None:
    if ref.get("path"):
        return _license_from_folder(expand(ref["path"]))
    if ref.get("gguf"):
        return _gguf_fact(ref, "license")
    if ref.get("hub"):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(ref["hub"], "README.md", revision=ref.get("revision"))
        except Exception:  # a malformed id or cache: no license found, said in the card
            return None
        return front_matter(Path(cached).read_text(errors="replace")).get("license") if isinstance(cached, str) else None
    return None


def _license_from_folder(folder: Path) -> str | None:
    readme = folder / "README.md"
    if readme.is_file():
        lic = front_matter(readme.read_text(errors="replace")).get("license")
        if lic:
            return str(lic)
    cfg = folder / "config.json"
    if cfg.is_file():
        try:
            lic = json.loads(cfg.read_text()).get("license")
        except (OSError, json.JSONDecodeError):
            lic = None
        return str(lic) if lic else None
    return None


def front_matter(text: str) -> dict:
    """The YAML front matter of a model card, or {}."""
    import yaml

    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    try:
        data = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}
