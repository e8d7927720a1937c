"""Stage distill: self-data distillation. The target (or, on-policy, the drafter) answers a prompt set.

Every assistant turn is regenerated turn by turn, on the model's own earlier answers (chat.py).
Generation is batched with left padding and a KV cache in length buckets (generate.py), or runs
on vLLM in a child process (vllm_backend.py), or on vLLM servers the user started (servers.py). Rows
are flushed to shards every ``flush_every`` prompts, so a killed run resumes from its last complete
shard (shards.py). The output is the distilled dataset of
docs/CONTRACTS.md in ``out_dir/dataset`` and ``out_dir/distill.json``.

The SD² ablation baseline: ``answers: dataset`` keeps the source's own recorded assistant turns
(ShareGPT's answers) instead of generating; nothing is generated, the rows have the same layout
and mask rule, and conversations without a recorded answer are dropped and counted.

On-policy (DistillSpec): ``policy: drafter`` has the drafter write the answers, and with
``topk_logits: k`` the target's top-k logits are recorded on them, one target forward per batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from sd2.core.fields import DType, dtype_field, runtime, runtime_fields
from sd2.data.prompts import Prompts
from sd2.core.precision import resolve


class Config(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompts: Prompts = Field(
        description="the prompt set (see docs/distill.md); a list is a mix, concatenated in order")
    max_new_tokens: int = Field(256, ge=1, le=32768, description="the longest answer per turn, in tokens")
    batch_size: int = Field(32, ge=1, le=4096, description="the most prompts decoded together (hf backend); a shard's prompts "
                                                           "are split into as few length-sorted batches of near-equal size")
    temperature: float = Field(0.0, ge=0.0, le=10.0, description="sampling temperature; 0 = greedy (deterministic)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling mass (temperature > 0)")
    topk_logits: int | None = Field(None, ge=1, le=1024,
                                    description="record the target's top-k logits (fp16) on every answer token, for KD; null = off")
    policy: Literal["target", "drafter"] = Field(
        "target", description="who writes the answers: the target (self-distillation) or the drafter (on-policy)")
    backend: Literal["hf", "vllm", "vllm-server"] = Field(
        "hf", description="hf (transformers, any device), vllm (vLLM in a child process: GPUs or vLLM's CPU build) or "
                          "vllm-server (the running vLLM servers listed in `servers`)")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="drop conversations whose first prompt (chat template applied) is longer; "
                                "a few very long prompts otherwise dominate generation time and the padded batch")
    flush_every: int = Field(256, ge=1, description="prompts per shard: a killed run resumes from the last shard")
    dtype: DType = dtype_field("weights dtype while generating")
    tensor_parallel_size: int = Field(1, ge=1, description="vllm backend: GPUs per model")
    servers: list[str] | None = runtime(
        None, since="2026-12-02", description="backend vllm-server: the base URLs of vLLM servers serving the "
                                              "target (`vllm serve`), e.g. [http://127.0.0.1:8001]; the prompts are "
                                              "shared among them. Not in the fingerprint: other servers' answers "
                                              "are the same data")
    requests_per_server: int = runtime(
        64, since="2026-12-02", ge=1, le=4096, description="backend vllm-server: requests in flight per server (the "
                                                            "server batches them; raise it to its --max-num-seqs on a GPU)")
    request_timeout_s: float = runtime(
        600.0, since="2026-12-02", gt=0, description="backend vllm-server: seconds one answer may take before its "
                                                      "server counts as failed and the request goes to another")
    answers: Literal["generate", "dataset"] = Field(
        "generate", description="generate: the target (or drafter) writes every assistant turn; dataset: keep the "
                                "source's own recorded answers (ShareGPT, messages files), cut at max_new_tokens; "
                                "conversations without one are dropped and counted (no_recorded_answer)")

    @model_validator(mode="after")
    def _answers(self) -> "Config":
        if self.answers == "dataset" and self.policy == "drafter":
            raise ValueError("answers 'dataset' keeps the source's answers, so no model writes them; "
                             "policy 'drafter' does not apply (leave policy: target)")
        return self

    @model_validator(mode="after")
    def _servers(self) -> "Config":
        from sd2.serve.remote import normalise

        if self.backend != "vllm-server":
            if self.servers:
                raise ValueError(f"servers is set but backend is '{self.backend}'; set backend: vllm-server to "
                                 f"distill on those servers")
            return self
        if not self.servers:
            raise ValueError("backend 'vllm-server' needs `servers`: the base URLs of the vLLM servers serving the "
                             "target, e.g. servers: [http://127.0.0.1:8001] (docs/distill.md)")
        if self.tensor_parallel_size != 1:
            raise ValueError("tensor_parallel_size applies to backend vllm; a server sets its own "
                             "(vllm serve --tensor-parallel-size)")
        urls = [normalise(u) for u in self.servers]
        twice = sorted({u for u in urls if urls.count(u) > 1})
        if twice:
            raise ValueError(f"servers lists {', '.join(twice)} more than once")
        self.servers = urls
        return self


def consumes(config: Config) -> tuple[str, ...]:
    """The target gives the tokenizer (and writes or scores the answers); the drafter only on-policy."""
    return ("target",) if config.policy == "target" else ("target", "model")


def run(config: Config, inputs, out_dir: Path, ctx) -> dict:
    import hashlib
    import time

    from sd2.core.artifacts import write_json_atomic
    from sd2.core.errors import Sd2Error
    from sd2.data.dataset import DISTILL_JSON, features
    from sd2.data.prompts import load_prompts, with_user_turn
    from sd2.stages.distill import shards
    from sd2.stages.distill.chat import ChatFormat, RecordedAnswers, converse, with_recorded_answers
    from sd2.stages.distill.generate import topk_on_responses

    convs = with_user_turn(load_prompts(config.prompts), "distill.prompts", ctx.log)
    no_answer = 0
    if config.answers == "dataset":
        convs, no_answer = with_recorded_answers(convs)
        if not convs:
            raise Sd2Error("distill.answers is 'dataset' but no selected conversation has a recorded assistant "
                           "answer (MT-bench, HumanEval, gsm_symbolic and text files have none); use a ShareGPT or "
                           "messages source, or answers: generate")
        if no_answer:
            ctx.log.warning("distill: dropped %d conversation(s) without a recorded answer to their first turn",
                            no_answer)
    if inputs.target is None:
        raise Sd2Error("distill needs the target model")
    if config.policy == "drafter" and inputs.model is None:
        raise Sd2Error("distill.policy is 'drafter' but the run has no drafter; set `drafter:` or policy: target")
    generator, tok, teacher, writer_name = _backend(config, inputs, ctx)
    fmt = ChatFormat(tok, generator.sampling.stop_ids)
    recorded = RecordedAnswers(fmt, config.max_new_tokens) if config.answers == "dataset" else None
    dropped = 0
    if config.max_prompt_tokens is not None:
        kept = [c for c in convs if len(fmt.start(c).ids) <= config.max_prompt_tokens]
        dropped = len(convs) - len(kept)
        if not kept:
            raise Sd2Error(f"distill.max_prompt_tokens = {config.max_prompt_tokens} drops every one of the "
                           f"{len(convs)} conversations; raise it or leave it unset")
        if dropped:
            ctx.log.info("distill: dropped %d of %d conversations whose prompt is over max_prompt_tokens = %d",
                         dropped, len(convs), config.max_prompt_tokens)
        convs = kept
    feats = features(config.topk_logits is not None)

    ids_hash = hashlib.sha256("\n".join(c.id for c in convs).encode()).hexdigest()[:16]
    key = {"config": config.model_dump(mode="json", exclude=runtime_fields(Config)), "seed": ctx.seed, "prompts": len(convs), "ids": ids_hash,
           "target": inputs.target.fingerprint,
           "model": inputs.model.fingerprint if config.policy == "drafter" else None}
    folder = shards.prepare(out_dir, key)
    n_shards = -(-len(convs) // config.flush_every)
    finished = set(shards.done(folder, n_shards))
    if finished:
        ctx.log.info("distill: resuming, %d of %d shards already written", len(finished), n_shards)
    ctx.log.info("distill: %s %d conversation(s) (%d turns), %d shard(s)", writer_name, len(convs),
                 sum(len(c.turns) for c in convs), n_shards)

    try:
        bar = ctx.progress(total=sum(len(c.turns) for c in convs), desc="distill", unit="answer")
        for i in range(n_shards):
            chunk = convs[i * config.flush_every:(i + 1) * config.flush_every]
            if i in finished:
                bar.update(sum(len(c.turns) for c in chunk))
                continue
            t0 = time.perf_counter()
            states = converse(chunk, fmt, generator.generate, seed=ctx.seed * 100_003 + i, progress=bar,
                              recorded=recorded)
            gen_s = time.perf_counter() - t0
            rows = [{"id": s.conv.id, "category": s.conv.category, "messages": s.messages,
                     "response": s.messages[-1]["content"], "input_ids": s.ids, "loss_mask": s.mask} for s in states]
            if teacher is not None:
                scored = topk_on_responses(teacher, [(r["input_ids"], r["loss_mask"]) for r in rows],
                                           config.topk_logits, config.batch_size)
                for row, (top_ids, top_vals) in zip(rows, scored):
                    row["topk_ids"], row["topk_logits"] = top_ids, top_vals
            stats = {"rows": len(rows), "tokens": sum(s.generated for s in states),
                     "responses": sum(len(s.conv.turns) for s in states), "truncated": sum(s.truncated for s in states),
                     "generate_s": round(gen_s, 3)}
            shards.write(folder, i, rows, feats, stats)
            ctx.log_metrics(shard=i, **stats, tokens_per_s=round(stats["tokens"] / max(gen_s, 1e-9), 2))
    finally:   # the vllm backend's child process ends with the stage, also on an error
        if hasattr(generator, "close"):
            generator.close()
    bar.close()
    if hasattr(generator, "answers"):
        ctx.log.info("distill: answers per server this run: %s", generator.answers())

    total = {k: sum(shards.stats(folder, i)[k] for i in range(n_shards))
             for k in ("rows", "tokens", "responses", "truncated", "generate_s")}
    shards.combine(folder, n_shards, out_dir / "dataset")
    metrics = {"rows": total["rows"], "tokens": total["tokens"], "dropped_long_prompts": dropped,
               "no_recorded_answer": no_answer,
               "mean_response_tokens": round(total["tokens"] / max(total["responses"], 1), 2),
               "truncated": total["truncated"],
               "tokens_per_s": round(total["tokens"] / max(total["generate_s"], 1e-9), 2)}
    if fmt.rewrites:
        ctx.log.warning("distill: the chat template rewrites earlier turns; %d turn(s) were re-tokenized and keep "
                        "the loss mask on their last answer only", fmt.rewrites)
    write_json_atomic(out_dir / DISTILL_JSON, {
        "tokenizer": inputs.target.ref, "vocab_size": _vocab_size(inputs.target, tok),
        "topk": config.topk_logits, "policy": config.policy, "answers": config.answers, "stats": metrics})
    ctx.log.info("distill: %d rows, %d tokens (%.1f per answer, %d truncated) at %.1f tok/s", metrics["rows"],
                 metrics["tokens"], metrics["mean_response_tokens"], metrics["truncated"], metrics["tokens_per_s"])
    return metrics


def _backend(config: Config, inputs, ctx):
    """(generator, the target's tokenizer, the model that records top-k logits or None, writer name)."""
    from sd2.core.errors import Sd2Error
    from sd2.core.models import load_model, load_tokenizer, model_eos_ids, same_tokenizer
    from sd2.stages.distill.generate import HFGenerator, Sampling

    tok = load_tokenizer(inputs.target)
    if config.answers == "dataset":   # nothing generates: only the stop tokens, and the target for top-k
        generator = _Recorded(Sampling(max_new_tokens=config.max_new_tokens, stop_ids=_stop_ids(inputs.target, tok)))
        teacher = None
        if config.topk_logits is not None:
            teacher = load_model(inputs.target, device=ctx.device, dtype=resolve(config.dtype, ctx.device).torch_dtype)
        return generator, tok, teacher, "keeping the source's recorded answers to"
    writer_src, writer_name = (inputs.target, "the target answers") if config.policy == "target" \
        else (inputs.model, "the drafter answers")
    if config.policy == "drafter" and not same_tokenizer(tok, load_tokenizer(inputs.model)):
        raise Sd2Error("distill.policy 'drafter' needs the drafter to share the target's tokenizer "
                       "(its answers are scored by the target token by token); use policy: target")
    chosen = resolve(config.dtype, ctx.device)
    dtype = chosen.torch_dtype
    teacher = None
    if config.backend == "hf":
        writer = load_model(writer_src, device=ctx.device, dtype=dtype)
        sampling = Sampling(config.temperature, top_p=config.top_p, max_new_tokens=config.max_new_tokens,
                            stop_ids=model_eos_ids(writer, tok))
        generator = HFGenerator(writer, tok.pad_token_id, sampling, config.batch_size)
        if config.topk_logits is not None:
            teacher = writer if config.policy == "target" else load_model(inputs.target, device=ctx.device, dtype=dtype)
    else:
        sampling = Sampling(config.temperature, top_p=config.top_p, max_new_tokens=config.max_new_tokens,
                            stop_ids=_stop_ids(writer_src, tok))
        if config.backend == "vllm":
            from sd2.stages.distill.vllm_backend import VllmGenerator

            generator = VllmGenerator(writer_src.ref, sampling, config.tensor_parallel_size, chosen.dtype, ctx.seed,
                                      writer_src.trust_remote_code)
        else:
            from sd2.serve.remote import expected_names
            from sd2.stages.distill.servers import ServerGenerator

            generator = ServerGenerator(config.servers, expected_names(writer_src.ref, writer_src.label,
                                                                       writer_src.hub_id),
                                        tok, sampling, config.requests_per_server, config.request_timeout_s, ctx.log)
            ctx.log.info("distill: the servers compute in their own precision (vllm serve --dtype; sd2 cannot read "
                         "it): this recipe's dtype resolves to %s", chosen.dtype)
        if config.topk_logits is not None:
            teacher = load_model(inputs.target, device=ctx.device, dtype=dtype)
    return generator, tok, teacher, writer_name


def _stop_ids(src, tok) -> tuple[int, ...]:
    """The ids that end an answer without loading the model: its tokenizer's eos and those of its
    config and generation config (what the hf backend reads from the loaded model)."""
    from transformers import AutoConfig, GenerationConfig

    from sd2.core.errors import reading
    from sd2.core.models import eos_ids

    with reading(f"the config of '{src.ref}'", "a model folder or Hub id with config.json",
                 "check the model reference"):
        cfg = AutoConfig.from_pretrained(src.ref, trust_remote_code=src.trust_remote_code)
    try:
        gcfg = GenerationConfig.from_pretrained(src.ref)
    except OSError:
        gcfg = None
    return eos_ids(tok, cfg, gcfg)


class _Recorded:
    """The generator slot with ``answers: dataset``: stop tokens only; converse never calls generate."""

    def __init__(self, sampling):
        self.sampling = sampling

    def generate(self, prompts, seed=0, progress=None):
        raise AssertionError("answers: dataset generates nothing")


def _vocab_size(target, tok) -> int:
    from transformers import AutoConfig

    try:
        return int(AutoConfig.from_pretrained(target.ref).vocab_size)
    except (OSError, ValueError, AttributeError):
        return len(tok)
