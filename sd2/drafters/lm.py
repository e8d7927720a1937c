"""Drafter kind ``lm``: a standalone causal LM (a save_pretrained folder, safetensors only).

Its prunable linears are the decoder's (sd2/sparsity.py), its MACs sd2/macs.py's, its vocabulary
trimming a K-row lm_head (sd2/vocab.py), its calibrated pruning llm-compressor's ``oneshot``
(oneshot.py), its training loss CE / KD on its own logits (lm_train.py).
"""

from __future__ import annotations

from pathlib import Path

from sd2.core.errors import Sd2Error
from sd2.core.models import load_model, load_tokenizer, save_model
from sd2.macs import count_macs
from sd2.sparsity import decoder_linears, measure
from sd2.vocab import draft_to_target, trim_lm_head


def recognizes(folder: Path) -> bool:
    return (Path(folder) / "config.json").is_file()


def load(source, target=None, device: str = "cpu", dtype=None) -> "CausalLM":
    return CausalLM(load_model(source, device=device, dtype=dtype), load_tokenizer(source), source)


class CausalLM:
    """The ``Drafter`` protocol (sd2/drafters/__init__.py) for a causal LM."""

    kind = "lm"

    def __init__(self, model, tokenizer, source=None):
        self.module, self.tokenizer, self.source = model, tokenizer, source
        self.vocab_size = model.get_input_embeddings().weight.shape[0]

    def d2t(self):
        return draft_to_target(self.module)

    def linears(self) -> list:
        return decoder_linears(self.module)

    def macs(self):
        return count_macs(self.module)

    def sparsity(self) -> dict:
        return measure(self.module)

    def trim_vocab(self, keep: list[int]) -> None:
        trim_lm_head(self.module, keep)

    def prune_calibrated(self, config, samples: list[list[int]], ctx, out_dir: Path) -> dict:
        from sd2.drafters.oneshot import run_oneshot

        earlier = Path(str(self.source.ref)) / "recipe.yaml" if self.source is not None else None
        self.module = run_oneshot(self.module, self.tokenizer, samples, config, out_dir,
                                  existing_recipe=earlier if earlier is not None and earlier.is_file() else None)
        return {"recipe": "recipe.yaml"}

    def wants_topk(self, config) -> bool:
        return config.loss != "ce" and config.teacher == "topk"

    def training_task(self, config, rows_train, rows_val, pad_id: int, target, ctx):
        from sd2.drafters.lm_train import LMTask
        from sd2.modeling import untie_lm_head
        from sd2.train.losses import target_to_draft_map

        model, d2t, kd = self.module, self.d2t(), (config.loss if config.loss != "ce" else None)
        teacher_model = None
        if kd and config.teacher == "online":
            if target is None:
                raise Sd2Error("finetune.teacher = 'online' needs the target model, but none was given")
            teacher_model = load_model(target, device="cpu")
            t_vocab = teacher_model.get_output_embeddings().weight.shape[0]
            if t_vocab != self.vocab_size:
                raise Sd2Error(f"the target '{target.ref}' has {t_vocab} output tokens but the drafter "
                               f"'{self.source.ref}' reads {self.vocab_size}: an online teacher needs one vocabulary")
        head, emb = model.get_output_embeddings(), model.get_input_embeddings()
        tied = head is not None and head.weight is emb.weight
        if config.untie_embeddings and tied:
            untie_lm_head(model)
            ctx.log.info("untied lm_head from the input embeddings (the saved model is untied)")
        if config.freeze_embeddings:
            emb.weight.requires_grad_(False)
            if tied and not config.untie_embeddings:
                ctx.log.info("freeze_embeddings with tied embeddings: lm_head is the same matrix and is frozen too "
                             "(set untie_embeddings: true to train lm_head alone)")
        ctx.log.info("finetune on %d conversations (%d held out), loss %s%s, %s", len(rows_train), len(rows_val),
                     config.loss, f" (teacher {config.teacher})" if kd else "",
                     "mask held" if config.hold_mask else "mask off")
        return LMTask(model, config, rows_val, pad_id, d2t, target_to_draft_map(d2t, self.vocab_size), teacher_model)

    def save(self, out_dir: Path, extra_files: dict | None = None) -> None:
        self.module.eval()
        save_model(self.module, self.tokenizer, out_dir)
        for name, content in (extra_files or {}).items():
            (Path(out_dir) / name).write_text(content)
