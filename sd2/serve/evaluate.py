"""How ``evaluate.engine: vllm`` gives vLLM each drafter (the run itself: sd2/stages/evaluate/vllm.py):
- a standalone drafter as ``draft_model`` (its folder; it must share the target's tokenizer and
  have the full vocabulary: ``sd2 publish`` writes the full-vocabulary equivalent of a trimmed one);
- an EAGLE-1 head as ``eagle``, exported to vLLM's layout first (sd2/heads/export.py) under
  ``out_dir/vllm_exports``; an EAGLE-3 head as ``eagle3``, exported there in the speculators layout
  (sd2/heads/eagle3/export.py); heads vLLM cannot run are refused with the reason;
- ``evaluate.prompt_lookup`` as vLLM's own ``ngram`` (``prompt_lookup_max/min`` = max/min_ngram).
"""

from __future__ import annotations

from pathlib import Path

from sd2.core.errors import Sd2Error


def conflicts(config) -> list[str]:
    """What engine: vllm needs that ``config`` does not have (evaluate.Config validates with it)."""
    bad = []
    if not config.decode:
        bad.append("decode: true (vLLM decodes; decode: false is sd2's teacher forcing)")
    if config.gamma == "auto":
        bad.append("a fixed gamma, not auto (vLLM drafts a fixed num_speculative_tokens)")
    if (config.width if isinstance(config.width, list) else [config.width]) != [1]:
        bad.append("width 1 (vLLM's draft_model, eagle and ngram draft chains)")
    return bad


def speculative_configs(config, inputs, out_dir: Path) -> dict[str, dict]:
    """{drafter name: vLLM speculative_config without num_speculative_tokens}; refusals as Sd2Error."""
    from sd2 import vocab
    from sd2.core.models import load_tokenizer, same_tokenizer
    from sd2.heads import io
    from sd2.heads.eagle3 import export as e3
    from sd2.heads.export import vllm_unsupported, write_vllm_eagle

    tok = load_tokenizer(inputs.target)
    out = {}
    for name, src in (inputs.drafters or {}).items():
        ref = Path(src.ref)
        if io.is_head(ref):
            hc = io.read_config(ref)
            eagle3 = hc.type == "eagle3"
            why = (e3.vllm_unsupported(hc) if eagle3 else vllm_unsupported(hc))
            if why is not None:
                raise Sd2Error(f"evaluate.engine: vllm: drafter {name!r} ({ref}) has {why}; evaluate it with "
                               "engine: sd2 (sd2 eval without --engine vllm)")
            dest = out_dir / "vllm_exports" / name
            dest.mkdir(parents=True, exist_ok=True)
            if eagle3:      # the verifier named in the export is the target vLLM serves
                e3.export_folder(ref, dest, str(inputs.target.ref))
            else:
                write_vllm_eagle(ref, dest)
            out[name] = {"model": str(dest), "method": "eagle3" if eagle3 else "eagle"}
        elif (ref / vocab.MAP_FILE).is_file():
            raise Sd2Error(f"evaluate.engine: vllm: drafter {name!r} ({ref}) has a trimmed vocabulary, which vLLM's "
                           "draft_model cannot load; `sd2 publish` writes its full-vocabulary equivalent: evaluate that")
        elif bool(inputs.cross_tokenizer) or not same_tokenizer(tok, load_tokenizer(src)):
            raise Sd2Error(f"evaluate.engine: vllm: drafter {name!r} ({ref}) has another tokenizer than the target; "
                           "vLLM's draft_model needs the target's vocabulary (engine: sd2 drafts across tokenizers)")
        else:
            out[name] = {"model": str(ref), "method": "draft_model"}
    if config.prompt_lookup:
        pl = config.prompt_lookup
        out[pl.name] = {"method": "ngram", "prompt_lookup_max": pl.max_ngram, "prompt_lookup_min": pl.min_ngram}
    return out
