"""Write report.json, report.md (tables in the style of the SD² paper), plots and usage snippets,
all from the typed report (sd2.core.report)."""

from __future__ import annotations

from pathlib import Path

from sd2 import drafters
from sd2.core.report import REPORT_FILE, DrafterInfo, Report
from sd2.stages.evaluate.plots import write_plots


def _fmt(x, nd=2, suffix=""):
    return "–" if x is None else f"{x:.{nd}f}{suffix}"


def _macs(n) -> str:
    return f"{n / 1e9:.3f} G" if n >= 1e9 else f"{n / 1e6:.1f} M"


_LABEL = {"sd2": "sd2", "transformers": "transformers", "vllm": "vLLM"}


def best_snippets(report: Report) -> dict[str, str]:
    """Snippets for the report's best drafter; {} when there is none."""
    b = report.best
    t = report.target
    # transformers and vLLM load the Hub id when known, else the folder the target was loaded from
    # (a GGUF's converted copy): "PACKAGE:FILE.gguf" is sd2's spelling, which they cannot read
    return snippets(t.shown, report.drafters[b.drafter], b.gamma, t.loadable) if b else {}


def snippets(target: str, d: DrafterInfo, gamma: int, hub_id: str | None = None) -> dict[str, str]:
    """How to use a drafter outside sd2: transformers and vLLM (a drafter kind that reads the target's
    features is no transformers ``assistant_model``: its kind writes its own, ``usage_snippets``).
    ``target`` is the target as sd2's command line names it; transformers and vLLM load ``hub_id``
    (a Hub id or a local folder they can read) when given, else ``target``."""
    if d.kind in drafters.KINDS and drafters.KINDS[d.kind].feature_level:
        return drafters.kind_module(d.kind).usage_snippets(target, d, gamma, hub_id)
    target = hub_id or target
    path, note = d.path, ""
    if d.vocab:   # a K-row lm_head: transformers' assistant_model and vLLM need full-vocabulary logits
        path = f"{d.path.rstrip('/')}-fullvocab"
        note = (f"# This drafter has a trimmed vocabulary ({d.vocab.draft_vocab_size or 'K'}-row lm_head + "
                "draft_to_target.json). transformers and vLLM need a\n"
                "# full-vocabulary head, so export an equivalent drafter first (it proposes the same greedy drafts):\n"
                f"#   sd2 publish {d.path} --repo-id you/drafter --dry-run --out {path}\n")
    hf = (f"{note}from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
          f"tok = AutoTokenizer.from_pretrained({target!r})\n"
          f"target = AutoModelForCausalLM.from_pretrained({target!r})\n"
          f"drafter = AutoModelForCausalLM.from_pretrained({path!r})\n"
          "ids = tok.apply_chat_template([{\"role\": \"user\", \"content\": \"Hello!\"}], add_generation_prompt=True,\n"
          "                              return_dict=True, return_tensors=\"pt\")\n"
          f"out = target.generate(**ids, assistant_model=drafter, num_assistant_tokens={gamma},\n"
          "                      num_assistant_tokens_schedule=\"constant\", do_sample=False, max_new_tokens=256)\n"
          "print(tok.decode(out[0, ids[\"input_ids\"].shape[1]:], skip_special_tokens=True))\n")
    vllm = (f"{note}from vllm import LLM, SamplingParams\n\n"
            f"llm = LLM(model={target!r},\n"
            f"          speculative_config={{\"method\": \"draft_model\", \"model\": {path!r},\n"
            f"                              \"num_speculative_tokens\": {gamma}}})\n"
            "out = llm.generate([\"Hello!\"], SamplingParams(temperature=0.0, max_tokens=256))\n"
            "print(out[0].outputs[0].text)\n")
    return {"transformers": hf, "vllm": vllm}


def sparse_vs_layer(report: Report) -> list[tuple]:
    """SD²'s comparison at equal MACs: every sparse drafter's result beside the layer-pruned drafter's
    of nearest effective MACs, at the same γ and T. Rows: (sparse Result, layer Result, MAL ratio)."""
    kinds = {name: d.pruning for name, d in report.drafters.items()}
    rows = []
    for r in report.results:
        if kinds.get(r.drafter) != "sparse" or r.macs_per_token is None:
            continue
        peers = [q for q in report.results if kinds.get(q.drafter) == "layer" and q.gamma == r.gamma
                 and q.temperature == r.temperature and q.macs_per_token is not None]
        if peers:
            q = min(peers, key=lambda q: abs(q.macs_per_token - r.macs_per_token))
            rows.append((r, q, r.mal / q.mal if q.mal else None))
    return rows


def _cpu(machine: dict) -> str:
    """ " CPU: AMD EPYC (torch kernels AVX512, AVX512-BF16), 2 threads." where the report recorded it."""
    if not machine.get("cpu"):
        return ""
    bf16 = [n for k, n in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16")) if machine.get(k)]
    return (f" CPU: {machine['cpu']} (torch kernels {machine.get('capability', '?')}"
            f"{', ' + ', '.join(bf16) if bf16 else ', no native bf16'}), {machine.get('torch_threads', '?')} threads.")


def _packed(s) -> str:
    """" Linears prepacked (oneDNN, N of the target's)." when sd2's engine packed them (sd2/engine/packed.py)."""
    return f" Linears prepacked (oneDNN; {s.packed_linears} of the target's)." if s.packed_linears else ""


def markdown(report: Report, plots: list[str]) -> str:
    s, t = report.settings, report.target
    lines = ["# sd2 evaluation", "",
             f"Target `{t.shown}`{f' (Hub: {t.hub_id})' if t.hub_id and t.hub_id != t.shown else ''}: {_macs(t.macs['effective'])} MACs/token. {s.n_prompts} prompts, "
             f"{s.max_new_tokens} new tokens, batch size 1, {s.repeats} timed pass(es) after {s.warmup} warm-up, "
             f"{s.device} {s.dtype}.{_cpu(s.machine)}{_packed(s)}", ""]
    for temp, b in report.baseline.items():
        lines.append(f"- target alone at T={temp}: {b.tokens} tokens in {b.wall_s:.2f} s ({b.tokens_per_s:.1f} tok/s)")
    if not s.decode:
        lines.append("- **MAL only** (`decode: false`): no speculative decoding ran. MAL and acceptance are each "
                     "drafter's exact greedy chain rounds, simulated by teacher forcing on the target's greedy answers "
                     "(docs/evaluate.md); there is no wall-clock speedup and losslessness was not checked.")
    filters = ([f"top-k {s.top_k}"] if s.top_k else []) + ([f"top-p {s.top_p:g}"] if s.top_p < 1 else []) \
        + ([f"min-p {s.min_p:g}"] if s.min_p > 0 else [])
    if filters:
        lines.append(f"- sampling at T>0 filtered by {', '.join(filters)} (target and drafters alike)")
    lines += ["", "| drafter | γ | width | T | sparsity | MACs/token | MAC ratio | MAL | MAL (TF) | acc. rate | speedup | "
              "theoretical | MAC-based | modeled | c | lossless |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report.results:
        ll = {True: "yes", False: "**NO**", None: "n/a (T>0)" if r.temperature > 0 else "not checked"}[r.lossless]
        lines.append(f"| {r.drafter} | {r.gamma} | {r.width} | {r.temperature:g} | "
                     f"{_fmt(100 * r.sparsity if r.sparsity is not None else None, 1, '%')} | "
                     f"{_macs(r.macs_per_token or 0)} | {_fmt(r.mac_ratio, 3)} | {_fmt(r.mal, 3)} | "
                     f"{_fmt(r.greedy_mal_teacher_forced, 3)} | {_fmt(r.acceptance_rate, 3)} | "
                     f"{_fmt(r.speedup, 2, '×')} | {_fmt(r.theoretical_speedup, 2, '×')} | "
                     f"{_fmt(r.mac_speedup, 2, '×')} | {_fmt(r.modeled_speedup, 2, '×')} | {_fmt(r.c_measured, 3)} | {ll} |")
    auto = [(name, d.shape) for name, d in report.drafters.items() if d.shape is not None]
    if auto:   # gamma: auto: the chosen shape and the model's prediction next to the measurement
        lines += ["", f"`gamma: auto` (sd2.engine.shape) chose, per drafter, the depth 1..{s.max_gamma} and width of highest "
                  "modeled speedup (measured c, v(n) and pilot acceptance; greedy):", ""]
        for name, sh in auto:
            row = next(iter(report.rows(name, sh.gamma, 0.0, sh.width)), None)
            meas = f", measured {row.speedup:.2f}×" if row is not None and row.speedup is not None else ""
            lines.append(f"- {name}: γ={sh.gamma}, width {sh.width}: modeled {sh.predicted_speedup:.2f}×{meas}")
    gmax = max(s.gammas)
    lines += ["", "## Acceptance per position", "",
              "Defined on depth: among rounds whose draft reached depth i, the share whose accepted path reached "
              "depth i (for a chain, depth i is draft token i).", "",
              "| drafter | γ | width | T | " + " | ".join(str(i) for i in range(1, gmax + 1)) + " |",
              "|---|---|---|---|" + "---|" * gmax]
    for r in report.results:
        cells = [_fmt(a, 3) for a in r.acceptance_per_position] + [""] * (gmax - r.gamma)
        lines.append(f"| {r.drafter} | {r.gamma} | {r.width} | {r.temperature:g} | " + " | ".join(cells) + " |")
    cats = sorted({c for r in report.results for c in r.mal_per_category})
    if len(cats) > 1:
        lines += ["", "## MAL per category", "", "| drafter | γ | width | T | " + " | ".join(cats) + " |",
                  "|---|---|---|---|" + "---|" * len(cats)]
        for r in report.results:
            lines.append(f"| {r.drafter} | {r.gamma} | {r.width} | {r.temperature:g} | "
                         + " | ".join(_fmt(r.mal_per_category.get(c), 3) for c in cats) + " |")
    pairs = sparse_vs_layer(report)
    if pairs:
        lines += ["", "## Sparse vs layer pruning at equal MACs", "",
                  "Each sparse drafter beside the layer-pruned drafter of nearest effective MACs (SD²: sparse "
                  "drafters lie above layer-pruned ones at every budget).", "",
                  "| γ | T | sparse | MACs/token | MAL | layer-pruned | MACs/token | MAL | MAL ratio sparse ÷ layer |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r, q, ratio in pairs:
            lines.append(f"| {r.gamma} | {r.temperature:g} | {r.drafter} | {_macs(r.macs_per_token)} | {_fmt(r.mal, 3)} | "
                         f"{q.drafter} | {_macs(q.macs_per_token)} | {_fmt(q.mal, 3)} | {_fmt(ratio, 3, '×')} |")
    lines += ["", "MAL = tokens committed ÷ target forwards. MAL (TF) = greedy MAL by teacher forcing. speedup = "
              "target-only wall ÷ speculative wall (median over passes). theoretical = MAL/(γc+1) with c measured; "
              "MAC-based = MAL/(γ·MAC ratio+1). Definitions: docs/evaluate.md.", ""]
    verify = {}
    for r in report.results:
        if r.verify_cost is not None:
            verify.setdefault(1 + r.gamma * r.width, r.verify_cost)
    if verify:   # why measured speedup falls short of MAL/(γc+1): an n-token verify is not free
        lines += ["Verification cost v(n) (one target forward over n = 1 + γ·width tokens ÷ one target decode step; "
                  "MAL/(γc+1) assumes 1): " + ", ".join(f"n={n}: {v:.2f}" for n, v in sorted(verify.items()))
                  + ". modeled = MAL/(γc+v(n)).", ""]
    pl = [r for r in report.results if r.kind == "prompt_lookup"]
    if pl:
        lines += [f"`{pl[0].drafter}` is prompt lookup decoding (n-gram drafts from the prompt and the output; no "
                  "model, no training): the free baseline a trained drafter has to beat. Its modeled speedup is "
                  "MAL/(d+v̄) with its measured drafting time d and mean verification cost v̄ per round.", ""]
    for p in plots:
        lines += [f"![{p}]({p})", ""]
    snip = best_snippets(report)
    if snip:
        b = report.best
        what = "measured speedup" if b.by == "speedup" else "MAC-based speedup (no timings)"
        lines += [f"## Use the best drafter: `{b.drafter}` (γ={b.gamma})", "",
                  f"The best is the highest {what} at T={b.temperature:g} among "
                  f"{'lossless results' if s.decode else 'results (losslessness not checked: MAL only)'} of the drafters with a model (prompt lookup is the baseline, never the best): "
                  f"{b.value:.2f}× (docs/evaluate.md \"best\"). `sd2 publish` publishes it by default.", "",
                  *[line for name, text in snip.items()
                    for line in (f"{_LABEL[name]}:", "", f"```{'bash' if name == 'sd2' else 'python'}", text.rstrip(),
                                 "```", "")]]
    return "\n".join(lines)


def write_report(report: Report, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(report, out_dir)
    for name, text in best_snippets(report).items():
        (out_dir / f"use_with_{name}.{'sh' if name == 'sd2' else 'py'}").write_text(text)
    report.save(out_dir / REPORT_FILE)
    (out_dir / "report.md").write_text(markdown(report, plots))
