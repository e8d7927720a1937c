"""EAGLE-3 heads (docs/eagle3.md): the module (model.py), its draft vocabulary (draft_vocab.py), the
training-time test (ttt.py), the speculators-format export vLLM loads (export.py), and their place in
the pipeline: the head folder (io.py), the ``head`` kind's ``Eagle3Drafter`` and the head stage's
build (drafter.py), and finetune's ``Eagle3Task`` (train.py)."""

from sd2.heads.eagle3.draft_vocab import DraftVocabMap, choose_draft_vocab
from sd2.heads.eagle3.model import Eagle3Config, Eagle3Head, build, resolve_aux_layers, target_aux
from sd2.heads.eagle3.ttt import TTTResult, training_time_test, ttt_unroll

__all__ = ["DraftVocabMap", "choose_draft_vocab", "Eagle3Config", "Eagle3Head", "build", "resolve_aux_layers",
           "target_aux", "TTTResult", "training_time_test", "ttt_unroll"]
