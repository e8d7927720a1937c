"""Training under FSDP: accelerate's FSDP2 (torch's ``fully_shard``), on GPUs and on CPU over gloo.

Launch: ``accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes N ...``
(docs/finetune.md). What works where, found on this project's CPU machines (accelerate 1.16,
torch 2.13, 2 processes over gloo, tests/test_finetune_fsdp.py):

- torch's FSDP2 ``fully_shard`` runs on CPU over gloo: forward, backward (reduce-scatter),
  ``clip_grad_norm_`` over DTensors, fused AdamW on DTensor shards, and full state dicts of the
  model and the optimizer gathered to rank 0 and broadcast back from it. torch's FSDP1 also ran
  there (a toy model, forward, backward and AdamW, ``device_id=cpu``).
- accelerate 1.16 does not use it there: with an FSDP config and a CPU ``Accelerator`` it starts
  the gloo world (MULTI_CPU) and then wraps the model in DDP, silently. ``enable_on_cpu`` switches
  that Accelerator to FSDP with the plugin accelerate built from the launch config, so that
  ``accelerator.prepare`` runs accelerate's own FSDP2 path (``fsdp2_prepare_model``), exactly as on
  GPUs, where accelerate selects FSDP itself.
- sd2 trains under FSDP2 only (``fsdp_version: 2``): the mask and the checkpoints address each
  parameter by name as a DTensor; FSDP1's flat parameters have no such names.

How the loop uses it (sd2/train/loop.py): the task's module stays a plain, whole module (the one
the stage saves and validates); a copy of it (``trained_copy``) is what accelerate shards and the
optimizer trains. ``pull_full_state`` gathers the trained weights into the plain module on every
process before validation and at the end. A frozen model the task forwards (a head's target, an
online teacher) is sharded layer by layer (``shard_frozen``); its embeddings and lm_head, which a
head shares, stay whole on every process.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.nn as nn


def active(accelerator) -> bool:
    """True when the accelerator trains under FSDP."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def enable_on_cpu(accelerator) -> None:
    """Under an FSDP launch config on CPU, make ``accelerator`` use FSDP (module docstring: accelerate
    1.16 falls back to DDP there). Refuses FSDP1 with an error naming the config field."""
    from accelerate import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return
    plugin = getattr(accelerator.state, "fsdp_plugin", None) or FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        from sd2.core.errors import Sd2Error

        raise Sd2Error(f"the accelerate config asks for FSDP version {plugin.fsdp_version}; sd2 trains under FSDP2 "
                       "only: set fsdp_config.fsdp_version: 2 (configs/accelerate/fsdp.yaml)")
    if accelerator.distributed_type == DistributedType.MULTI_CPU:
        if accelerator.mixed_precision != "no":
            plugin.set_mixed_precision(accelerator.mixed_precision)
        accelerator.state.fsdp_plugin = plugin
        accelerator.state.distributed_type = DistributedType.FSDP
        # as accelerate does when it picks FSDP itself: a later AcceleratorState() copies PartialState's over
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def fresh_wrap_policy(accelerator) -> None:
    """Before each ``prepare``: forget the layer class accelerate inferred for the previous model.
    accelerate stores the class it infers from a model's ``_no_split_modules`` (e.g. LlamaDecoderLayer)
    on the process's one FSDP plugin, and a later finetune stage in the same ``sd2 run`` (a head, whose
    layer is sd2's DecoderLayer) then failed with "Could not find the transformer layer class
    LlamaDecoderLayer in the model" (a newcomer check; tests/test_finetune_fsdp.py runs both kinds in one
    run). A class named in the launch config (FSDP_TRANSFORMER_CLS_TO_WRAP) is the user's and stays."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is not None and not os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP"):
        plugin.transformer_cls_names_to_wrap = None


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (a view: in-place changes reach the DTensor); ``t`` itself otherwise."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def trained_copy(module: nn.Module, shared: tuple = ()) -> nn.Module:
    """A deep copy of ``module`` for accelerate to shard. The objects in ``shared`` (a head's frozen
    target, its embeddings and lm_head) are not copied: the copy refers to the same ones."""
    memo = {id(o): o for o in shared}
    out = copy.deepcopy(module, memo)
    if getattr(module, "_no_split_modules", None):
        out._no_split_modules = list(module._no_split_modules)
    return out


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def pull_full_state(sharded: nn.Module, plain: nn.Module) -> None:
    """Gather the sharded module's weights and copy them into ``plain`` (same parameter names), on
    every process (a collective: all processes call it)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(sharded, options=_options())
    with torch.no_grad():
        own = dict(plain.named_parameters(remove_duplicate=False)) | dict(plain.named_buffers())
        for name, value in full.items():
            own[name].copy_(value.to(own[name].device))


def full_model_state(sharded: nn.Module) -> dict:
    """The whole state dict on rank 0, on CPU ({} on the other ranks). A collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(sharded, options=_options(cpu_offload=True))


def full_optimizer_state(sharded: nn.Module, optimizer) -> dict:
    """The optimizer's whole state on rank 0, keyed by parameter name ({} elsewhere). A collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(sharded, optimizer, options=_options(cpu_offload=True))


def load_full_state(sharded: nn.Module, optimizer, model_state: dict, optimizer_state: dict) -> None:
    """Restore from whole states read on rank 0 (the others pass {}): rank 0 broadcasts, each keeps its shards."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(sharded, model_state, options=_options(broadcast_from_rank0=True))
    set_optimizer_state_dict(sharded, optimizer, optimizer_state, options=_options(broadcast_from_rank0=True))


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules of the classes a transformers model names in ``_no_split_modules`` (its decoder layers)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def shard_frozen(model: nn.Module, accelerator) -> int:
    """Shard a frozen model (a head's target, an online teacher) decoder layer by decoder layer with
    torch's ``fully_shard``, in place: each process keeps 1/N of every layer's weights and gathers a
    layer's weights for its forward only. Its embeddings, final norm and lm_head stay whole on every
    process (a head reads the embeddings and lm_head directly, outside the target's forward); for a
    large target the layers are nearly all of it (Llama-3.1-70B: 80 layers, 68.5B of its 70.6B
    parameters).

    Every process must then run the same number of forwards of it, in the same order (each is a
    collective). Returns the number of layers sharded. Not through ``accelerator.prepare``: accelerate's FSDP2 takes one (trained) model."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    blocks = decoder_blocks(model)
    if not blocks:
        from sd2.core.errors import Sd2Error

        raise Sd2Error(f"cannot shard {type(model).__name__} under FSDP: it names no decoder layer class in "
                       "_no_split_modules")
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    # The root is the module whose forward runs (the base model: features and the online teacher
    # call it); it manages no weights of its own, and with it the layers are not roots, so each
    # gives its gathered weights back after its forward (FSDP2 keeps a root's weights gathered).
    base = model.base_model if getattr(model, "base_model", None) is not None else model
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    fully_shard(base, mesh=mesh, ignored_params={p for p in base.parameters() if id(p) not in in_blocks})
    return len(blocks)
