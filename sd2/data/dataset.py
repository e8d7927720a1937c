"""The distilled dataset (docs/CONTRACTS.md "Distilled dataset"): the columns, and a checked loader."""

from __future__ import annotations

from pathlib import Path

from sd2.core.errors import Sd2Error, reading

REQUIRED_COLUMNS = ("id", "category", "messages", "response", "input_ids", "loss_mask")
TOPK_COLUMNS = ("topk_ids", "topk_logits")
DISTILL_JSON = "distill.json"


def features(topk: bool):
    """The datasets Features of the distilled dataset (top-k logits stored as float16)."""
    from datasets import Features, Sequence, Value

    cols = {
        "id": Value("string"),
        "category": Value("string"),
        "messages": [{"role": Value("string"), "content": Value("string")}],
        "response": Value("string"),
        "input_ids": Sequence(Value("int32")),
        "loss_mask": Sequence(Value("int8")),
    }
    if topk:
        cols["topk_ids"] = Sequence(Sequence(Value("int32")))
        cols["topk_logits"] = Sequence(Sequence(Value("float16")))
    return Features(cols)


def load_distilled(folder: str | Path):
    """The distilled dataset of a distill stage folder (``folder/"dataset"``), with its columns checked."""
    import datasets

    folder = Path(folder)
    data = folder / "dataset"
    if not data.is_dir():
        raise Sd2Error(f"no distilled dataset in {folder}: expected the folder {data} written by the distill stage; "
                       "rerun distill (or point dataset at a distill stage folder)")
    with reading(f"the distilled dataset {data}", "a datasets.save_to_disk folder written by the distill stage",
                 "rerun distill"):
        ds = datasets.load_from_disk(str(data))
    if isinstance(ds, datasets.DatasetDict):
        raise Sd2Error(f"{data} is a DatasetDict; the distilled dataset is a single Dataset (docs/CONTRACTS.md)")
    missing = [c for c in REQUIRED_COLUMNS if c not in ds.column_names]
    if missing:
        raise Sd2Error(f"the distilled dataset {data} lacks the column(s) {', '.join(missing)} "
                       f"(has {', '.join(ds.column_names)}); rerun distill with this sd2 version")
    half = [c for c in TOPK_COLUMNS if c in ds.column_names]
    if len(half) == 1:
        other = next(c for c in TOPK_COLUMNS if c not in half)
        raise Sd2Error(f"the distilled dataset {data} has the column {half[0]} without {other}; rerun distill")
    return ds
