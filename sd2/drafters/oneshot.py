"""SparseGPT and Wanda (or a raw recipe) through llm-compressor 0.14's ``oneshot``.

Facts about llm-compressor 0.14 that shape this module (checked on tiny models):
- ``oneshot`` needs a model loaded from disk (it re-reads ``name_or_path``) and a tokenizer.
- SparseGPT/Wanda spell unstructured as ``mask_structure="0:0"``; "unstructured" is rejected.
  Their "N:M" zeroes N of every M weights along the input dimension (sd2 keeps that convention).
- ``targets=["Linear"]`` would include lm_head; ``ignore=["lm_head"]`` does not exclude it (the
  name it is matched as is "lm_head."), ``ignore=["re:.*lm_head"]`` does. Embeddings are skipped
  by the modifier itself, tied or not; ``DenseGuard`` in sparsity.py checks both after the run.
- Their prunable types are Linear and Conv1d/2d/3d: GPT-2's transformers ``Conv1D`` is not one,
  so the stage checks the measured sparsity afterwards.
- The ``sequential`` pipeline calibrates and prunes one decoder layer at a time, propagating the
  pruned layer's outputs to the next; memory stays near one model plus one layer's activations.
"""

from __future__ import annotations

from pathlib import Path


def modifiers(config) -> list:
    """The llm-compressor modifier for sd2's method, sparsity and structure."""
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    structure = "0:0" if config.nm is None else config.mask_structure
    cls = {"sparsegpt": SparseGPTModifier, "wanda": WandaPruningModifier}[config.method]
    return [cls(sparsity=config.sparsity, mask_structure=structure, targets=["Linear"], ignore=["re:.*lm_head"])]


def _calibration_dataset(samples: list[list[int]]):
    import datasets

    return datasets.Dataset.from_dict({"input_ids": samples, "attention_mask": [[1] * len(s) for s in samples]})


def _quiet_logs(out_dir: Path) -> int:
    """llm-compressor logs every pruned module (and its error) to stdout: keep only errors on the
    console and write the rest as text to ``out_dir/llmcompressor.log``. Returns the file sink's
    id for ``logger.remove``. An LLM_COMPRESSOR_LOG_* variable set by the user wins."""
    from llmcompressor.logger import LoggerConfig, configure_logger, logger

    configure_logger(LoggerConfig(console_log_level="ERROR"))
    return logger.add(str(out_dir / "llmcompressor.log"), level="INFO",
                      format="{time:YYYY-MM-DD HH:mm:ss} | {level} | {function} | {message}")


def run_oneshot(model, tokenizer, samples: list[list[int]], config, out_dir: Path, existing_recipe: Path | None = None):
    """Prune ``model`` (loaded from a folder) in place; write the applied ``recipe.yaml`` into
    ``out_dir``, appended to ``existing_recipe`` (the input model's) when there is one."""
    from llmcompressor import oneshot
    from llmcompressor.core import active_session

    from sd2.core.errors import Sd2Error

    recipe = config.recipe if config.recipe is not None else modifiers(config)
    sink = _quiet_logs(Path(out_dir))
    try:
        model = oneshot(model=model, tokenizer=tokenizer, recipe=recipe, dataset=_calibration_dataset(samples),
                        pipeline="sequential", num_calibration_samples=len(samples),
                        max_seq_length=max(len(s) for s in samples), shuffle_calibration_samples=False,
                        batch_size=1)
    except (ValueError, KeyError, TypeError) as e:
        if config.recipe is None:
            raise
        raise Sd2Error(f"llm-compressor could not apply the prune recipe: {e}") from None
    finally:
        from llmcompressor.logger import logger

        logger.remove(sink)
    # The sequential pipeline leaves compressed-tensors offload wrappers and an hf_device_map
    # ({"": "cpu"}) on the model; save_pretrained then treats it as offloaded. Return a plain model.
    from compressed_tensors.offload import remove_dispatch

    remove_dispatch(model, onload_tensors=True)
    # oneshot also replaces the instance's save_pretrained with a wrapper that compresses, converts
    # to accelerate offload and writes its own recipe.yaml. sd2 stores dense with zeros through
    # sd2.core.models.save_model, so restore transformers' own method.
    if "save_pretrained" in vars(model):
        del model.save_pretrained
    active_session().lifecycle.recipe.yaml(file_path=str(Path(out_dir) / "recipe.yaml"),
                                          existing_recipe_path=str(existing_recipe) if existing_recipe else None)
    return model
