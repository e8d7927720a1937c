"""sd2 publish: drafter selection, the Hub-ready folder, the model card, trimmed vocabularies, heads,
and no local paths in what is published. The upload path is tests/test_publish_upload.py.

The run folder (``run_dir``, built by tests/publish_run.py) holds tiny models in stage folders with
manifests (lineage), and its report.json is written by a real evaluate run over them, so a drift
between evaluate (the writer) and publish (the reader) fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from publish_run import REPO, _lineage, _manifest
from tiny import make_model

from sd2.core.errors import Sd2Error


def _report(run_dir):
    from sd2.core.report import Report

    return Report.read(run_dir / "04_evaluate")


# -- selection ---------------------------------------------------------------------------------------
def test_default_is_the_reports_own_best_and_errors_are_clear(run_dir):
    from sd2.publish.select import select

    report = _report(run_dir)
    best = report.best
    assert best is not None and best.by == "speedup" and best.temperature == 0.0
    sel = select(run_dir)
    assert sel.name == best.drafter and sel.main_gamma == best.gamma and "the report's best" in sel.why
    assert sel.results == report.rows(drafter=best.drafter) and sel.entry == report.drafters[best.drafter]
    assert select(run_dir, "dense").model_dir == (run_dir / "02_dense.finetune").resolve()
    assert select(run_dir, "sparse").model_dir == (run_dir / "03_sparse.prune").resolve()   # relative path
    with pytest.raises(Sd2Error, match=r"'sparce' is not in .*did you mean 'sparse'"):
        select(run_dir, "sparce")
    with pytest.raises(Sd2Error, match="neither a model folder"):
        select(run_dir / "01_distill")


# -- the dry-run folder ------------------------------------------------------------------------------
def test_dry_run_folder_loads_with_plain_transformers_and_generates(run_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sd2.publish import publish

    lines = []
    out = tmp_path / "export"
    res = publish(run_dir, "sd2-org/sparse", drafter="sparse", dry_run=True, out=out, say=lines.append)
    assert res.drafter == "sparse" and "branch 'sparse' (--drafter)" in lines[0]
    names = set(p.name for p in out.iterdir())
    assert {"model.safetensors", "config.json", "tokenizer.json", "sparsity.json", "README.md"} <= names
    assert "manifest.json" not in names and not list(tmp_path.glob(".export.tmp-*"))
    src = run_dir / "03_sparse.prune"
    assert (out / "sparsity.json").read_text() == (src / "sparsity.json").read_text()
    a, b = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)        # bit-exact, zeros kept

    model = AutoModelForCausalLM.from_pretrained(out)                              # plain transformers
    tok = AutoTokenizer.from_pretrained(out)
    zeros = sum(int((p == 0).sum()) for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2)
    assert zeros > 0 and zeros == sum(int((v == 0).sum()) for k, v in a.items() if ".layers." in k and v.dim() == 2)
    ids = tok("the quick brown fox", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 6 or tok.eos_token_id in gen[0].tolist()

    with pytest.raises(Sd2Error, match="exists and is not empty"):
        publish(run_dir, REPO, dry_run=True, out=out, say=lambda s: None)
    with pytest.raises(Sd2Error, match="--dry-run needs --out"):
        publish(run_dir, REPO, dry_run=True, say=lambda s: None)


def test_card_holds_the_reports_numbers(run_dir, tmp_path):
    from typer.testing import CliRunner

    from sd2.pipeline.cli import app
    from sd2.publish.card import num
    from sd2.publish.provenance import front_matter

    out = tmp_path / "card"
    res = CliRunner().invoke(app, ["publish", str(run_dir), "--repo-id", REPO, "--drafter", "dense", "--dry-run",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "branch 'dense' (--drafter)" in res.output
    card = (out / "README.md").read_text()
    fm = front_matter(card)
    assert fm["license"] == "mit"                                 # inherited from the target the drafter derives from
    assert {"speculative-decoding", "sparse", "sd2"} <= set(fm["tags"]) and "base_model" not in fm
    assert "base_model is left out" in card                       # a local target is no Hub id: said, not guessed
    report = _report(run_dir)
    g = report.main_gamma()
    rows = [line for line in card.splitlines() if line.startswith(f"| {g} | 0 |")]
    main = report.rows("dense", g, 0.0)[0]
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[2:5] == [num(main.mal), num(main.mal_per_request), num(main.acceptance_rate)]
    assert cells[5] == ", ".join(num(x) for x in main.acceptance_per_position)
    assert cells[6:9] == [num(main.speedup), num(main.theoretical_speedup), num(main.mac_speedup)]
    assert cells[9] == num(main.macs_per_token) and main.speedup is not None and main.mac_speedup is not None
    cats = sorted(main.mal_per_category)
    cat_row = next(line for line in card.splitlines() if line.startswith(f"| {g} | 0 | ") and line.count("|") == len(cats) + 3)
    assert cat_row.split("|")[3:3 + len(cats)] == [f" {num(main.mal_per_category[c])} " for c in cats]
    other = 2 if g == 4 else 4
    assert any(line.startswith(f"| {other} | 0 | {num(report.rows('dense', other, 0.0)[0].mal)} |")
               for line in card.splitlines())   # every setting is listed
    cpus = report.settings.machine["cpu_count"]
    assert report.target.ref not in card                          # a local path means nothing on the Hub
    for needle in (report.target.fingerprint, "a local model folder named target", f"cpu_count {cpus}", f"| γ (main) | {g} |",
                   "dense.finetune", "lr: 0.001", "drafter.derive", "assistant_model=drafter",
                   '"method": "draft_model"', f'"num_speculative_tokens": {g}', f'"{REPO}"', f"num_assistant_tokens = {g}"):
        assert needle in card, needle


# -- trimmed vocabulary ------------------------------------------------------------------------------
def _trimmed_folder(tmp_path, tokenizer) -> Path:
    """A trimmed drafter (docs/CONTRACTS.md) whose kept logits are mostly negative: zero rows would win there."""
    from sd2 import vocab
    from sd2.core.models import load_model, save_model

    src = make_model(tmp_path / "full", "llama", n_layers=2, seed=4, tokenizer=tokenizer)
    model = load_model(src)
    keep = list(range(0, len(tokenizer), 5))
    vocab.trim_lm_head(model, keep)
    ids = torch.randint(0, len(tokenizer), (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = model.model(ids).last_hidden_state[0]
        u = torch.nn.functional.normalize(h.mean(0), dim=0)
        model.lm_head.weight -= 3.0 * u * (h @ u).abs().mean()                # push kept logits below 0
    out = tmp_path / "trimmed"
    save_model(model, tokenizer, out)
    return out


def test_trimmed_drafter_exports_an_exact_full_vocabulary_equivalent(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from sd2 import vocab
    from sd2.core.models import load_model
    from sd2.publish import publish

    folder = _trimmed_folder(tmp_path, tokenizer)
    trimmed = load_model(folder)
    mapping = vocab.draft_to_target(trimmed)
    out = tmp_path / "export"
    publish(folder, REPO, dry_run=True, out=out, say=lambda s: None)
    assert not (out / vocab.MAP_FILE).exists() and (out / "sd2_vocab.json").is_file()
    assert "sd2_vocab" not in json.loads((out / "config.json").read_text())
    full = AutoModelForCausalLM.from_pretrained(out).eval()                     # plain transformers, no sd2 loader
    assert full.lm_head.weight.shape[0] == len(tokenizer)
    ids = torch.randint(0, len(tokenizer), (4, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        k_logits = trimmed(ids).logits
        f_logits = full(ids).logits
    want = mapping[k_logits.argmax(-1)]
    assert torch.equal(f_logits.argmax(-1), want)                               # greedy proposals are the same
    assert torch.allclose(f_logits[..., mapping], k_logits, atol=1e-5)         # kept rows untouched
    # The naive alternative fails on this drafter: zero rows give logit 0 and win where all kept logits are < 0.
    zero_rows = torch.zeros_like(f_logits)
    zero_rows[..., mapping] = k_logits
    assert (zero_rows.argmax(-1) != want).any()
    card = (out / "README.md").read_text()
    assert "## Vocabulary" in card and "convex hull" in card and "No sd2 lineage" in card


def test_report_snippet_for_a_trimmed_best_drafter_exports_then_loads_with_plain_transformers(tmp_path, tokenizer):
    """evaluate's usage snippet must work for a trimmed drafter: a K-row head is no assistant_model, so
    the snippet names the export command, and the folder it then loads is that export."""
    import re
    import shlex

    from transformers import AutoModelForCausalLM
    from typer.testing import CliRunner

    from sd2.core.report import DrafterInfo, VocabInfo
    from sd2.pipeline.cli import app
    from sd2.stages.evaluate.report import snippets

    folder = _trimmed_folder(tmp_path, tokenizer)
    target = make_model(tmp_path / "target", "llama", n_layers=2, seed=5, tokenizer=tokenizer)
    snip = snippets(str(target), DrafterInfo(path=str(folder), vocab=VocabInfo(draft_vocab_size=64)), 3)
    for text in snip.values():
        assert "64-row lm_head" in text and f"sd2 publish {folder} " in text
    command = next(line for line in snip["transformers"].splitlines() if "sd2 publish" in line)
    args = shlex.split(command.split("sd2 ", 1)[1])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    loaded = re.search(r"drafter = AutoModelForCausalLM.from_pretrained\('([^']+)'\)", snip["transformers"]).group(1)
    assert loaded != str(folder) and f"'{loaded}'" in snip["vllm"]
    drafter = AutoModelForCausalLM.from_pretrained(loaded)
    assert drafter.lm_head.weight.shape[0] == len(tokenizer)                   # a full-vocabulary assistant_model
    full = AutoModelForCausalLM.from_pretrained(target)
    ids = torch.tensor([[1, 5, 9, 14]])
    plain = full.generate(ids, do_sample=False, max_new_tokens=12)
    assisted = full.generate(ids, assistant_model=drafter, num_assistant_tokens=3,
                             num_assistant_tokens_schedule="constant", do_sample=False, max_new_tokens=12)
    assert torch.equal(plain, assisted)                                         # the snippet's use is lossless


def test_a_pruned_gpt2_drafter_publishes_its_sparsity(tmp_path, tokenizer):
    """GPT-2 keeps its blocks under transformer.h.N and its linear maps are Conv1D: publish measures
    them with the definition prune uses (a regex on 'layers.N' once measured 0% here)."""
    from sd2.core.context import StageInputs, standalone_context
    from sd2.core.models import ModelSource
    from sd2.publish import publish
    from sd2.stages import prune

    src = make_model(tmp_path / "gpt2", "gpt2", n_layers=2, seed=6, tokenizer=tokenizer)
    pruned = tmp_path / "01_sparse.prune"
    pruned.mkdir()
    metrics = prune.run(prune.Config(method="magnitude", sparsity=0.5), StageInputs(model=ModelSource(str(src), "g")),
                        pruned, standalone_context(pruned))
    assert metrics["decoder_sparsity"] == pytest.approx(0.5, abs=0.01)
    out = tmp_path / "export"
    res = publish(pruned, REPO, dry_run=True, out=out, say=lambda s: None)
    assert res.drafter
    card = (out / "README.md").read_text()
    assert "Measured decoder sparsity: 0.5" in card
    assert json.loads((out / "sparsity.json").read_text())["decoder_sparsity"] == pytest.approx(0.5, abs=0.01)

    from sd2.publish.export import measure_sparsity

    overall, per = measure_sparsity(out)
    assert overall == pytest.approx(0.5, abs=0.01)
    assert per and all(k.startswith("transformer.h.") for k in per)


# -- no local paths in what is published -------------------------------------------------------------
@pytest.mark.parametrize("source", [None, "HuggingFaceTB/SmolLM2-135M-Instruct"])
def test_published_folder_holds_no_local_paths(run_dir, tmp_path, tokenizer, monkeypatch, source):
    """A GGUF target shipped in a Python package, a run under the publisher's home directory, a prompt
    file and a prune recipe given by absolute path: no file of the published folder names any of them.
    The target is named by its Hub id when the GGUF header gives one, else by package and file."""
    from test_bad_input import write_gguf_header

    from sd2.publish import publish
    from sd2.publish.provenance import front_matter

    home = tmp_path / "home" / "alice"
    monkeypatch.setenv("HOME", str(home))
    site = home / "site"
    (site / "fakepkg").mkdir(parents=True)
    (site / "fakepkg" / "__init__.py").write_text("")
    write_gguf_header(site / "fakepkg" / "Tiny.Q4.gguf", "llama", layers=4, source=source)
    monkeypatch.syspath_prepend(str(site))
    cache_ref = str(home / ".cache" / "sd2" / "gguf" / "Tiny.Q4-0123456789abcdef")
    prompts, prune_recipe = str(home / "data" / "q.jsonl"), str(home / "recipes" / "prune.yaml")

    run = home / "work" / "artifacts" / "leak"
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump({
        "name": "leak", "target": {"gguf": "Tiny.Q4.gguf", "package": "fakepkg"},
        "drafter": {"derive": "target", "keep_layers": 2},
        "distill": {"prompts": {"source": prompts}}}))
    lineage = _lineage(("drafter.derive", "derive", {"keep_layers": 2}),
                       ("sparse.prune", "prune", {"method": None, "recipe": prune_recipe}))
    model = make_model(run / "02_sparse.prune", "llama", n_layers=2, seed=3, tokenizer=tokenizer)
    _manifest(model, "sparse.prune", "prune", lineage, "sparse")
    ev = run / "03_evaluate"
    ev.mkdir()
    report = json.loads((run_dir / "04_evaluate" / "report.json").read_text())  # a real tiny evaluation's report
    report["target"]["ref"] = cache_ref
    report["settings"]["prompts"] = {"source": prompts, "limit": 2}
    for entry in report["drafters"].values():
        entry["path"], entry["lineage"] = str(model), lineage
    (ev / "report.json").write_text(json.dumps(report))
    _manifest(ev, "evaluate", "evaluate", [])

    out = tmp_path / "pub"
    publish(run, REPO, drafter="sparse", dry_run=True, out=out, say=lambda line: None)
    card = (out / "README.md").read_text()
    leaks = [str(home), "alice", str(run), cache_ref, str(tmp_path)]
    for f in sorted(out.rglob("*")):
        if f.is_file():
            text = f.read_bytes().decode("utf-8", errors="replace")
            for leak in leaks:
                assert leak not in text, f"{f.name} names {leak!r}"
    if source:
        assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
        assert 'AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")' in card
    else:
        assert "the GGUF file Tiny.Q4.gguf of the Python package fakepkg" in card
        assert "base_model" not in front_matter(card)
    assert "q.jsonl" in card and "prune.yaml" in card  # the file names stay, their folders go


@pytest.mark.parametrize("kind", ["fspad", "eagle"])
def test_a_head_publishes_in_the_format_that_runs_it(tmp_path, tokenizer, kind):
    """An FSPAD head (nothing in vLLM loads it) publishes as sd2's own head folder with the sd2 command
    on its card; an untrimmed EAGLE head in vLLM's EAGLE layout. Neither names the folder of the target
    it was trained against: the config names the target as a card reader can find it."""
    from safetensors.torch import load_file

    from sd2.core.models import load_model
    from sd2.heads import io
    from sd2.publish import publish

    target_dir = make_model(tmp_path / "target", "llama", n_layers=2, seed=2, tokenizer=tokenizer)
    head = io.build(kind, load_model(target_dir), target_ref=str(target_dir), target_fingerprint="fp")
    folder = tmp_path / "run" / "03_fspad.finetune"
    io.save(head, folder, tokenizer)
    out = tmp_path / "pub"
    publish(folder, REPO, dry_run=True, out=out, say=lambda line: None)
    cfg = json.loads((out / "config.json").read_text())
    card = (out / "README.md").read_text()
    for f in out.iterdir():
        assert str(target_dir) not in f.read_text(errors="replace"), f.name
        assert str(tmp_path) not in f.read_text(errors="replace"), f.name
    if kind == "fspad":
        assert cfg["sd2_head"]["type"] == "fspad" and "architectures" not in cfg
        assert set(load_file(str(out / "model.safetensors"))) == set(load_file(str(folder / "model.safetensors")))
        assert "nothing in vLLM runs it" in card and f"--drafter fspad={REPO.split('/')[-1]}" in card
    else:
        assert cfg["architectures"] == ["LlamaForCausalLM"] and "fc.weight" in load_file(str(out / "model.safetensors"))
        assert '"method": "eagle"' in card
