"""Stage prune: unstructured sparsity (SparseGPT, Wanda, magnitude; N:M) or layer pruning.

- ``sparsegpt`` and ``wanda``: llm-compressor's, calibrated on the distilled data, through the
  drafter kind (``prune_calibrated``): ``oneshot`` with the sequential pipeline for a causal LM
  (sd2/drafters/oneshot.py), its per-layer code on the target's features for a head.
- ``magnitude`` is plain torch, data-free (magnitude.py says why not llm-compressor).
- ``layer`` (a causal LM only) removes the contiguous block of decoder layers whose input and output hidden states
  are closest in angular distance (Gromov et al. 2024; layers.py).
- ``recipe`` (a causal LM only) passes a raw llm-compressor recipe through, for experts.

The output is a save_pretrained folder stored dense with zeros, ``sparsity.json`` (sparsity.py) and,
when llm-compressor ran, the ``recipe.yaml`` it applied (appended to the input model's own).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sd2.core.errors import Sd2Error
from sd2.core.paths import expand

METHODS = ("sparsegpt", "wanda", "magnitude", "layer")
_NM = re.compile(r"^(\d+):(\d+)$")


class CalibrationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    samples: int = Field(128, ge=1, description="conversations drawn from the distilled dataset")
    seq_len: int = Field(512, ge=8, description="tokens kept from the start of each conversation")
    seed: int | None = Field(None, description="which conversations are drawn; default: the run's seed")


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Literal["sparsegpt", "wanda", "magnitude", "layer"] | None = Field(
        None, description="sparsegpt | wanda | magnitude | layer (or give `recipe` instead)")
    sparsity: float | None = Field(
        None, description="share of each decoder linear layer's weights set to zero, in (0, 1); "
                          "N:M structures imply N/M and may omit it")
    mask_structure: str = Field(
        "unstructured", description="'unstructured', or 'N:M': N of every M consecutive weights along the "
                                    "input dimension are zero (llm-compressor's convention; '2:4' is 50%)")
    n_remove: int | None = Field(None, ge=1, description="layer: remove this many consecutive decoder layers")
    keep_layers: int | None = Field(None, ge=1, description="layer: keep this many decoder layers (n_remove = L - K)")
    match_sparsity: float | None = Field(
        None, description="layer: keep the number of layers whose decoder MACs are nearest those of this model at "
                          "this unstructured sparsity (e.g. 0.5, as SparseGPT 50% or 2:4), computed by sd2/macs.py")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig,
                                           description="calibration samples from the distilled dataset")
    recipe: str | None = Field(None, description="expert: a raw llm-compressor recipe (YAML text or a .yaml path), "
                                                 "applied with oneshot; excludes method, sparsity, mask_structure, "
                                                 "n_remove and keep_layers")

    @field_validator("sparsity", "match_sparsity")
    @classmethod
    def _sparsity_range(cls, v: float | None, info) -> float | None:
        if v is not None and not 0.0 < v < 1.0:
            raise ValueError(f"{info.field_name} must be in (0, 1), e.g. 0.5; got {v}")
        return v

    @field_validator("mask_structure")
    @classmethod
    def _structure(cls, v: str) -> str:
        v = v.strip()
        if v == "unstructured":
            return v
        m = _NM.match(v)
        if not m:
            raise ValueError(f"mask_structure must be 'unstructured' or 'N:M' with 0 < N < M (e.g. '2:4'); got {v!r}")
        n, mm = int(m.group(1)), int(m.group(2))
        if not 0 < n < mm:
            raise ValueError(f"mask_structure 'N:M' needs 0 < N < M (e.g. '2:4'); got {v!r}")
        return v

    @field_validator("recipe")
    @classmethod
    def _recipe(cls, v: str | None) -> str | None:
        if v is None:
            return v
        import yaml

        if "\n" not in v and v.strip().endswith((".yaml", ".yml")):
            if not expand(v).is_file():
                raise ValueError(f"recipe file not found: {v}")
            return v
        try:
            parsed = yaml.safe_load(v)
        except yaml.YAMLError as e:
            raise ValueError(f"recipe is neither a .yaml path nor valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(parsed, dict):
            raise ValueError("recipe must be an llm-compressor recipe (a YAML mapping of stages and modifiers) or a .yaml path")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        if self.recipe is not None:
            extra = [k for k in ("method", "sparsity", "n_remove", "keep_layers", "match_sparsity")
                     if getattr(self, k) is not None]
            if self.mask_structure != "unstructured":
                extra.append("mask_structure")
            if extra:
                raise ValueError(f"recipe excludes {', '.join(extra)}: put those settings inside the recipe")
            return self
        if self.method is None:
            raise ValueError(f"give a method ({' | '.join(METHODS)}) or a raw llm-compressor recipe")
        if self.method == "layer":
            given = [k for k in ("n_remove", "keep_layers", "match_sparsity") if getattr(self, k) is not None]
            if len(given) != 1:
                raise ValueError("method layer needs exactly one of n_remove, keep_layers or match_sparsity"
                                 + (f" (got {', '.join(given)})" if given else ""))
            if self.sparsity is not None or self.mask_structure != "unstructured":
                raise ValueError("method layer removes whole layers: sparsity and mask_structure do not apply")
            return self
        if self.n_remove is not None or self.keep_layers is not None or self.match_sparsity is not None:
            raise ValueError(f"n_remove, keep_layers and match_sparsity only go with method layer, not {self.method}")
        nm = self.nm
        if nm is None and self.sparsity is None:
            raise ValueError(f"method {self.method} needs a sparsity in (0, 1), e.g. 0.5")
        if nm is not None:
            implied = nm[0] / nm[1]
            if self.sparsity is None:
                self.sparsity = implied
            elif abs(self.sparsity - implied) > 1e-6:
                raise ValueError(f"sparsity {self.sparsity} does not match mask_structure "
                                 f"{self.mask_structure!r}, which means {implied:g}; omit sparsity or set it to {implied:g}")
        return self

    def requires(self) -> dict[str, str]:
        """Options that need a drafter capability (sd2.drafters.requires): removing decoder layers and
        llm-compressor's oneshot both need a whole causal LM."""
        if self.recipe is not None:
            return {"recipe": "causal_lm"}
        return {"method": "causal_lm"} if self.method == "layer" else {}

    @property
    def nm(self) -> tuple[int, int] | None:
        """(N, M) for an N:M structure, None when unstructured."""
        m = _NM.match(self.mask_structure)
        return (int(m.group(1)), int(m.group(2))) if m else None


def layer_request(n_layers: int, config: Config) -> tuple[int | None, str | None]:
    """(layers to remove, None) for ``method: layer`` on a model with ``n_layers`` decoder layers, or
    (0, why it is impossible). With ``match_sparsity`` the count depends on the model's MACs:
    (None, None) when possible. Used at validation, when the drafter's layer count is known, and at run time."""
    field = "keep_layers" if config.keep_layers is not None else "n_remove"
    if n_layers < 2:
        return 0, (f"a {n_layers}-layer drafter cannot be layer-pruned (it needs at least 2 decoder layers); "
                   f"drop this step, or prune weights instead (method: magnitude, sparsegpt or wanda)")
    if config.keep_layers is None and config.n_remove is None:
        return None, None
    n_remove = config.n_remove if config.n_remove is not None else n_layers - config.keep_layers
    if not 1 <= n_remove < n_layers:
        return 0, (f"the drafter has {n_layers} decoder layers at this step, so {field} must be in "
                   f"[1, {n_layers - 1}]; got {getattr(config, field)}")
    return n_remove, None


def consumes(config: Config) -> tuple[str, ...]:
    """Magnitude pruning is data-free: it does not rerun when the distilled data changes."""
    return ("model",) if config.method == "magnitude" else ("model", "dataset")


def run(config: Config, inputs, out_dir: Path, ctx) -> dict:
    import shutil

    from sd2 import drafters
    from sd2.core.context import PeakRSS
    from sd2.stages.prune import sparsity as sp

    if inputs.model is None:
        raise Sd2Error("prune needs a model: the branch has no drafter")
    if config.method != "magnitude" and inputs.dataset is None:
        raise Sd2Error("prune needs the distilled dataset for calibration: add a `distill:` section to the recipe")
    drafters.check("prune", config, inputs.model.kind)
    out_dir = Path(out_dir)
    seed = config.calibration.seed if config.calibration.seed is not None else ctx.seed
    drafter = drafters.load(inputs.model)
    if config.nm is not None:
        _check_nm(drafter.linears(), config)
    guard = sp.DenseGuard(drafter.module)
    n_before = drafter.macs().n_layers
    report: dict = {"removed_layers": [], "recipe": None}
    with PeakRSS() as rss:
        if config.method == "magnitude":
            from sd2.stages.prune.magnitude import magnitude_prune

            magnitude_prune(drafter.linears(), config.sparsity, config.nm)
        else:
            from sd2.stages.prune.calibration import calibration_samples

            samples = calibration_samples(inputs.dataset, config.calibration.samples, config.calibration.seq_len, seed, ctx)
            if config.method == "layer":   # a causal LM (drafters.check above)
                report.update(_prune_layers(drafter.module, samples, n_before, config, ctx))
            else:
                report.update(drafter.prune_calibrated(config, samples, ctx, out_dir))
    guard.check(drafter.module)
    measured = drafter.sparsity()
    if config.method in ("sparsegpt", "wanda") and config.sparsity and measured["decoder_sparsity"] < config.sparsity / 2:
        raise Sd2Error(f"llm-compressor pruned only {measured['decoder_sparsity']:.1%} of the decoder weights "
                       f"(asked {config.sparsity:.0%}); its SparseGPT/Wanda handle nn.Linear only, so for models "
                       "with other linear layers (GPT-2's Conv1D) use method: magnitude")
    drafter.save(out_dir)
    earlier = Path(inputs.model.ref) / "recipe.yaml"
    if report["recipe"] is None and earlier.is_file():
        shutil.copy(earlier, out_dir / "recipe.yaml")  # keep the chain of llm-compressor recipes
    macs = drafter.macs()
    structure = {"layer": "layer", None: "recipe"}.get(config.method, config.mask_structure)
    sp.write(out_dir, method=config.method or "recipe", structure=structure,
             target_sparsity=config.sparsity, measured=measured, removed_layers=report["removed_layers"],
             peak_rss_mb=rss.peak_mb, extra={k: v for k, v in report.items() if k not in ("removed_layers",)})
    metrics = {"decoder_sparsity": round(measured["decoder_sparsity"], 6), "macs_per_token": macs.effective,
               "dense_macs_per_token": macs.dense, "layers": macs.n_layers, "removed_layers": len(report["removed_layers"])}
    ctx.log.info("pruned (%s): decoder sparsity %.2f%%, %d layers, %.1f M MACs/token (dense %.1f M)",
                 config.method or "recipe", 100 * measured["decoder_sparsity"], macs.n_layers,
                 macs.effective / 1e6, macs.dense / 1e6)
    ctx.log_metrics(**metrics)
    return metrics


def _check_nm(linears: list, config: Config) -> None:
    """Every pruned layer's input dimension must be a multiple of M for an N:M structure."""
    m = config.nm[1]
    for name, mod in linears:
        cols = mod.weight.shape[0] if type(mod).__name__ == "Conv1D" else mod.weight.shape[1]
        if cols % m:
            raise Sd2Error(f"cannot apply mask_structure {config.mask_structure} to {name}: its input dimension "
                           f"{cols} is not a multiple of {m}")


def _prune_layers(model, samples, n_before: int, config: Config, ctx) -> dict:
    """method layer: remove the block of decoder layers of least angular distance (layers.py)."""
    from sd2.stages.prune.layers import prune_layers

    report = {}
    n_remove, problem = layer_request(n_before, config)
    if problem:
        raise Sd2Error(f"prune (method layer): {problem}")
    if n_remove is None:    # match_sparsity: the count follows from the model's MACs
        from sd2.macs import layers_for_sparsity

        keep, report["mac_budget"] = layers_for_sparsity(model, config.match_sparsity)
        if keep == n_before:
            raise Sd2Error(f"prune.match_sparsity = {config.match_sparsity}: the nearest decoder-MAC budget on "
                           f"{n_before} layers keeps them all; raise match_sparsity or use a deeper model")
        n_remove = n_before - keep
    report.update(prune_layers(model, samples, n_remove, ctx))
    return report
