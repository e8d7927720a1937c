"""The model card (README.md): YAML front matter, the run's numbers, the lineage, usage snippets.

Every number comes from the run's report.json, unrounded beyond 4 significant digits; a card made
from a bare model folder says that it carries no evaluation.
"""

from __future__ import annotations

import json

import yaml

from sd2.core.report import DrafterInfo
from sd2.publish.export import Exported
from sd2.publish.provenance import Provenance, public_name
from sd2.publish.select import Selection

TAGS = ["speculative-decoding", "sparse", "sd2", "draft-model"]


def num(x) -> str:
    """How the card writes a number: ints exactly (thousands separated), floats to 4 significant digits."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):
        return f"{x:,.0f}" if abs(x) >= 1e5 else f"{x:.4g}"
    return str(x)


def render(sel: Selection, prov: Provenance, exp: Exported, repo_id: str) -> str:
    front = {"license": prov.license, **({"base_model": prov.base_model} if prov.base_model else {}),
             "library_name": "transformers", "pipeline_tag": "text-generation", "tags": TAGS}
    parts = ["---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n",
             f"# {repo_id.split('/')[-1]}\n",
             f"A drafter for speculative decoding, built with sd2 (SD², Self-Distilled Sparse "
             f"Drafters). It proposes tokens that the target model `{prov.target}` "
             f"verifies; the target's output is unchanged, only faster. Published drafter: **{sel.name}** ({sel.why}).\n"]
    parts.append(_metrics(sel, exp, prov) if sel.results else
                 "## Metrics\n\nThis drafter was published from a model folder without an evaluation report: "
                 f"no acceptance or speedup numbers. Measured decoder sparsity: {num(exp.sparsity)}.\n")
    if exp.untrimmed:
        parts.append(_vocab_section(exp.untrimmed))
    parts.append(_lineage(sel.lineage))
    parts.append(_usage(repo_id, prov.target_hub, prov.target, sel, exp))
    notes = prov.notes + exp.notes
    if notes:
        parts.append("## Notes\n\n" + "".join(f"- {n}\n" for n in notes))
    return "\n".join(parts)


def _metrics(sel: Selection, exp: Exported, prov: Provenance) -> str:
    rep, entry = sel.report, sel.entry or DrafterInfo()   # a report without this drafter's entry: every fact "-"
    target, settings = rep.target, rep.settings
    rows = sorted(sel.results, key=lambda r: (r.gamma != sel.main_gamma, r.gamma, r.temperature))
    head = ("| γ | temperature | MAL | MAL per request | acceptance rate | acceptance per position | speedup "
            "(measured) | theoretical speedup | MAC speedup | MACs per token | dense MACs per token | sparsity | lossless |")
    lines = ["## Metrics\n", f"Speculative decoding of this drafter against the target, from the run's evaluation "
             f"(sd2 {rep.sd2_version}). MAL = tokens committed per target forward (accepted drafts + 1).\n",
             head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        acc = ", ".join(num(a) for a in r.acceptance_per_position)
        lines.append(f"| {r.gamma} | {num(r.temperature)} | {num(r.mal)} | "
                     f"{num(r.mal_per_request)} | {num(r.acceptance_rate)} | {acc} | "
                     f"{num(r.speedup)} | {num(r.theoretical_speedup)} | {num(r.mac_speedup)} | "
                     f"{num(r.macs_per_token)} | {num(r.dense_macs_per_token)} | "
                     f"{num(r.sparsity)} | {num(r.lossless)} |")
    cats = sorted({c for r in rows for c in r.mal_per_category})
    if cats:
        lines += ["", "MAL per category:\n", "| γ | temperature | " + " | ".join(cats) + " |",
                  "|" + "---|" * (len(cats) + 2)]
        for r in rows:
            lines.append(f"| {r.gamma} | {num(r.temperature)} | "
                         + " | ".join(num(r.mal_per_category.get(c)) for c in cats) + " |")
    macs, vocab = entry.macs, entry.vocab
    hw = ", ".join(f"{k} {v}" for k, v in settings.machine.items() if k != "host") or "-"
    setup = [
        ("target", f"`{prov.target}`"), ("target fingerprint", f"`{target.fingerprint or '-'}`"),
        ("drafter fingerprint", f"`{entry.fingerprint or '-'}`"),
        ("sparsity (decoder linear layers)", num(entry.sparsity)),
        ("sparsity measured on the published weights", num(exp.sparsity)),
        ("MACs per token (effective / dense)", f"{num(macs.get('effective'))} / {num(macs.get('dense'))}"),
        ("MAC ratio drafter / target", num(entry.mac_ratio)),
        ("measured cost ratio c", num(entry.c_measured)),
        ("draft vocabulary", f"{num(vocab.draft_vocab_size)} tokens, coverage {num(vocab.coverage)}"
         if vocab else "full"),
        ("γ (main)", num(sel.main_gamma)), ("temperatures", ", ".join(num(t) for t in settings.temperatures)),
        ("prompts", f"{num(settings.n_prompts)} ({_prompts(settings.prompts)}), "
                    f"{num(settings.max_new_tokens)} new tokens, batch size 1"),
        ("hardware", f"{settings.device or '-'} {settings.dtype or ''}; {hw}"),
    ]
    lines += ["", "| setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in setup]
    return "\n".join(lines) + "\n"


def _prompts(p) -> str:
    if isinstance(p, list):
        return "; ".join(_prompts(x) for x in p)
    if isinstance(p, dict):
        return ", ".join(f"{k}={public_name(v) if k == 'source' else v}" for k, v in p.items()
                         if v not in (None, False) and k in ("source", "limit", "skip"))
    return str(p) if p else "-"


def _vocab_section(info: dict) -> str:
    return (
        "## Vocabulary\n\n"
        f"sd2 trained this drafter with a trimmed vocabulary: its lm_head scored only "
        f"{num(info['draft_vocab_size'])} of the target's {num(info['full_vocab_size'])} tokens. Plain transformers "
        "(`assistant_model`) and vLLM expect logits over the full vocabulary, so this folder holds the full-vocabulary "
        "equivalent: the kept rows in their places, and every dropped token's row set to one point inside the convex "
        f"hull of the kept rows, (1 - {info['epsilon']}) · w_j + {info['epsilon']} · mean(w) with j = token "
        f"{info['filler_from_token']}. A point of that hull never scores above the best kept token, so a dropped token "
        "cannot win the argmax (short of all kept logits being exactly equal): greedy proposals are the trimmed "
        "drafter's. Zero rows would not do: with no bias they score 0, which beats every kept token whenever all "
        "kept logits are negative. Under sampling (temperature > 0) the dropped tokens keep a small probability, where "
        f"the trimmed drafter gave them none: {num(info['probe_dropped_mass_t1'])} of the mass at temperature 1 on a "
        f"{info['probe_tokens']}-token probe text (greedy agreement with the trimmed drafter there: "
        f"{num(info['probe_greedy_agreement'])}). Speculative sampling stays lossless whatever the drafter proposes; "
        f"only acceptance at temperature > 0 can differ slightly from the report. The kept target ids are in "
        "`sd2_vocab.json`.\n")


def _lineage(lineage: list[dict]) -> str:
    if not lineage:
        return "## Lineage\n\nNo sd2 lineage was recorded for this folder (no manifest.json).\n"
    out = ["## Lineage\n", "The chain of sd2 stages that produced these weights, each with its resolved config:\n"]
    for i, step in enumerate(lineage, 1):
        out.append(f"{i}. `{step.get('id')}` ({step.get('stage')}), fingerprint `{step.get('fingerprint')}`")
    out.append("\n<details><summary>stage configs</summary>\n")
    for step in lineage:
        config = _public(step.get("config") or {})
        out += [f"`{step.get('id')}`:", "```yaml", yaml.safe_dump(config, sort_keys=False).rstrip(),
                "```"]
    out.append("</details>\n")
    return "\n".join(out)


def _public(value):
    """A stage config with local paths (a prompt file, a prune recipe file) reduced to their names."""
    if isinstance(value, dict):
        return {k: _public(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_public(v) for v in value]
    return public_name(value) if isinstance(value, str) else value


def _usage(repo_id: str, target_hub: str | None, target: str, sel: Selection, exp: Exported) -> str:
    gamma = sel.main_gamma or 4
    target_id = target_hub or f"<the target: {target}>"
    from sd2.heads import io
    from sd2.heads.export import vllm_snippet

    if json.loads((exp.folder / "config.json").read_text()).get("speculators_model_type") == "eagle3":
        from sd2.heads.eagle3.export import VLLM_CHECKED

        return (f"## Usage\n\nAn EAGLE-3 head in the speculators layout: it reads three of the target's hidden "
                f"states, so it runs only beside its target, in vLLM's EAGLE-3 speculative decoding (layout checked "
                f"against {VLLM_CHECKED}):\n\n```python\n"
                + vllm_snippet(target_id, repo_id, gamma, method="eagle3")
                + "```\n\ntransformers' assisted generation cannot run a feature-level head; sd2 runs it too: "
                "`sd2 eval --target TARGET --drafter eagle3=HEAD_FOLDER` (on the sd2 head folder).\n")
    head = io.is_head(exp.folder)     # an sd2 head folder, or one in vLLM's EAGLE layout (a Llama config too)
    if head and "architectures" not in json.loads((exp.folder / "config.json").read_text()):
        from sd2.heads.export import VLLM_CHECKED, vllm_unsupported

        head = io.read_config(exp.folder)
        kind = head.type
        if kind == "eagle3":
            from sd2.heads.eagle3.export import VLLM_CHECKED, vllm_unsupported
        return (f"## Usage\n\nAn sd2 {kind.upper()} head: it reads the target's last hidden state, so it runs only "
                f"beside its target. vLLM cannot run it (checked against {VLLM_CHECKED}): it has "
                f"{vllm_unsupported(head)}. transformers' assisted generation cannot run a "
                f"feature-level head either. sd2's engine runs it (greedy is lossless):\n\n"
                f"```bash\n# in a clone of sd2, after `bash scripts/setup.sh`\n"
                f"huggingface-cli download {repo_id} --local-dir {repo_id.split('/')[-1]}\n"
                f"sd2 eval --target {target_hub or 'TARGET'} --drafter {kind}={repo_id.split('/')[-1]} --gamma {gamma}\n```\n")
    if head:
        from sd2.heads.export import VLLM_CHECKED, vllm_snippet

        return (f"## Usage\n\nAn EAGLE head: it reads the target's last hidden state, so it runs only beside its "
                f"target, in vLLM's EAGLE speculative decoding (layout checked against {VLLM_CHECKED}):\n\n"
                f"```python\n{vllm_snippet(target_id, repo_id, gamma)}```\n\n"
                "transformers' assisted generation cannot run a feature-level head. FSPAD heads are not "
                "supported by vLLM at all; sd2 runs both kinds: `sd2 eval --target TARGET --drafter NAME=HEAD_FOLDER`.\n")
    return f"""## Usage

The drafter shares the target's tokenizer. With transformers (assisted generation, greedy is lossless):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained({json.dumps(target_id)})
target = AutoModelForCausalLM.from_pretrained({json.dumps(target_id)})
drafter = AutoModelForCausalLM.from_pretrained({json.dumps(repo_id)})
drafter.generation_config.num_assistant_tokens = {gamma}                  # γ, as evaluated
drafter.generation_config.num_assistant_tokens_schedule = "constant"
inputs = tok.apply_chat_template([{{"role": "user", "content": "Explain speculative decoding."}}],
                                 add_generation_prompt=True, return_dict=True, return_tensors="pt")
out = target.generate(**inputs, assistant_model=drafter, max_new_tokens=128, do_sample=False)
print(tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

With vLLM (draft-model speculative decoding):

```python
from vllm import LLM, SamplingParams

llm = LLM(model={json.dumps(target_id)},
          speculative_config={{"model": {json.dumps(repo_id)}, "method": "draft_model", "num_speculative_tokens": {gamma}}})
print(llm.generate(["Explain speculative decoding."], SamplingParams(temperature=0, max_tokens=128))[0].outputs[0].text)
```

Sparse weights are stored dense with zeros (`sparsity.json` lists the per-layer sparsity); the speedup from
sparsity needs a sparse kernel, the layer and vocabulary savings do not.
"""
