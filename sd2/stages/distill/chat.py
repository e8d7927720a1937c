"""Multi-turn conversations as token sequences the model extends with its own answers.

Every turn is generated on exactly the tokens of the conversation so far: the prompt tokens of
the first turn, then the model's own generated tokens, then the template's text between that
answer and the next user turn, and so on. So the final ``input_ids`` is exactly what the model saw
and wrote, and ``loss_mask`` is 1 exactly on the tokens it generated (its end-of-turn token
included when it produced one).

The text between an answer and the next turn comes from the chat template itself: it is rendered
with a sentinel in place of the answer, and what follows the sentinel (the end-of-turn marker,
the next user turn and the generation prompt) is tokenized. When the template rewrites earlier
turns (so the history is not a prefix of the next prompt), the whole prompt is re-tokenized and
only the last answer keeps its mask.

Without a chat template (a base model), the prompt is the raw text; later turns are joined with a
blank line.

With ``answers: dataset`` the same carrying runs on the source's recorded answers instead of
generated ones (``RecordedAnswers``): each is tokenized, cut at ``max_new_tokens`` like a generated
answer, and closed with the template's end-of-turn token when it fits, so rows of both kinds have
one layout and one mask rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sd2.data.prompts import Conversation
from sd2.stages.distill.generate import Generated

SENTINEL = "\u2063SD2ANSWER\u2063"  # invisible separator: no template trims or escapes it


@dataclass
class ConvState:
    conv: Conversation
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    text: str = ""                       # the rendered prompt text of the current turn (template mode)
    generated: int = 0                   # generated tokens, all turns
    truncated: int = 0                   # answers cut at max_new_tokens
    last_stopped: bool = True


class ChatFormat:
    def __init__(self, tokenizer, stop_ids: tuple[int, ...]):
        self.tok = tokenizer
        self.templated = bool(getattr(tokenizer, "chat_template", None))
        self.stop_ids = set(stop_ids)
        self.rewrites = 0                # turns whose template rewrote history (mask kept on the last answer only)

    # -- rendering ---------------------------------------------------------------------------
    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def answer_text(self, g: Generated) -> str:
        ids = g.ids[:-1] if g.stopped and g.ids and g.ids[-1] in self.stop_ids else g.ids
        return self.tok.decode(ids, skip_special_tokens=False)

    # -- the conversation, turn by turn --------------------------------------------------------
    def start(self, conv: Conversation) -> ConvState:
        s = ConvState(conv)
        if conv.system is not None:
            s.messages.append({"role": "system", "content": conv.system})
        s.messages.append({"role": "user", "content": conv.turns[0]})
        if self.templated:
            s.text = self._render(s.messages, True)
            s.ids = self.tok.apply_chat_template(s.messages, add_generation_prompt=True, return_dict=True)["input_ids"]
            s.ids = list(s.ids)
        else:
            text = conv.turns[0] if conv.system is None else f"{conv.system}\n\n{conv.turns[0]}"
            s.ids = list(self.tok(text)["input_ids"])
        s.mask = [0] * len(s.ids)
        return s

    def add_answer(self, s: ConvState, g: Generated) -> None:
        s.ids += g.ids
        s.mask += [1] * len(g.ids)
        s.messages.append({"role": "assistant", "content": self.answer_text(g)})
        s.generated += len(g.ids)
        s.truncated += 0 if g.stopped else 1
        s.last_stopped = g.stopped and bool(g.ids) and g.ids[-1] in self.stop_ids

    def next_turn(self, s: ConvState, k: int) -> None:
        """Append user turn k (and the generation prompt) after the model's last answer."""
        user = {"role": "user", "content": s.conv.turns[k]}
        if not self.templated:
            self._extend(s, self._encode(f"\n\n{user['content']}\n\n"))
            s.messages.append(user)
            return
        with_sentinel = s.messages[:-1] + [{"role": "assistant", "content": SENTINEL}, user]
        rendered = self._render(with_sentinel, True)
        cut = rendered.rfind(SENTINEL)
        s.messages.append(user)
        if cut < 0 or rendered[:cut] != s.text:
            self._retokenize(s)
            return
        self._extend(s, self._encode(self._after_answer(s, rendered[cut + len(SENTINEL):])))
        s.text = self._render(s.messages, True)

    def finish(self, s: ConvState) -> None:
        """Close the conversation the way the template renders a finished one (no generation prompt)."""
        if not self.templated:
            return
        full = s.messages[:-1] + [{"role": "assistant", "content": SENTINEL}]
        rendered = self._render(full, False)
        cut = rendered.rfind(SENTINEL)
        if cut >= 0 and rendered[:cut] == s.text:
            self._extend(s, self._encode(self._after_answer(s, rendered[cut + len(SENTINEL):])))

    def _after_answer(self, s: ConvState, tail: str) -> str:
        """The template's text after an answer, minus the end-of-turn token the model already wrote."""
        if s.last_stopped:
            eos_text = self.tok.convert_ids_to_tokens(s.ids[-1])
            if tail.startswith(eos_text):
                return tail[len(eos_text):]
        return tail

    def _extend(self, s: ConvState, ids: list[int]) -> None:
        s.ids += ids
        s.mask += [0] * len(ids)

    def _retokenize(self, s: ConvState) -> None:
        self.rewrites += 1
        s.text = self._render(s.messages, True)
        s.ids = list(self.tok.apply_chat_template(s.messages, add_generation_prompt=True, return_dict=True)["input_ids"])
        s.mask = [0] * len(s.ids)


class RecordedAnswers:
    """The source's own answers as if generated: turn k of a conversation gets ``conv.answers[k]``,
    tokenized without special tokens, cut at ``max_new_tokens`` (then ``stopped`` is False, as for a
    generated answer that ran out), else closed with ``end_id``, the template's end-of-turn token."""

    def __init__(self, fmt: ChatFormat, max_new_tokens: int):
        self.fmt = fmt
        self.max_new_tokens = max_new_tokens
        self.end_id = end_of_turn_id(fmt)

    def __call__(self, states: list[ConvState], k: int, progress=None) -> list[Generated]:
        out = []
        for s in states:
            ids = self.fmt._encode(s.conv.answers[k])
            if len(ids) + 1 <= self.max_new_tokens:
                out.append(Generated(ids + [self.end_id], True))
            else:
                out.append(Generated(ids[: self.max_new_tokens], False))
        if progress is not None:
            progress.update(len(states))
        return out


def end_of_turn_id(fmt: ChatFormat) -> int:
    """The token that closes an assistant turn: the first token of the template's text after an
    answer when it is a stop token (ChatML's ``<|im_end|>``), else the tokenizer's eos."""
    tok = fmt.tok
    if fmt.templated:
        rendered = fmt._render([{"role": "user", "content": "?"}, {"role": "assistant", "content": SENTINEL}], False)
        tail = fmt._encode(rendered[rendered.rfind(SENTINEL) + len(SENTINEL):])
        if tail and tail[0] in fmt.stop_ids:
            return tail[0]
    if tok.eos_token_id is None:
        from sd2.core.errors import Sd2Error

        raise Sd2Error("distill.answers 'dataset' needs an end-of-turn token: the tokenizer has no eos and the chat "
                       "template closes no turn with a stop token")
    return int(tok.eos_token_id)


def with_recorded_answers(convs: list[Conversation]) -> tuple[list[Conversation], int]:
    """Each conversation cut before its first user turn without a recorded answer; those left with
    no turn at all are dropped. Returns (kept, how many were dropped)."""
    kept = []
    for c in convs:
        answers = c.answers or []
        n = next((k for k, a in enumerate(answers[: len(c.turns)]) if a is None), min(len(answers), len(c.turns)))
        if n:
            kept.append(Conversation(c.id, c.category, c.turns[:n], c.system, answers[:n]))
    return kept, len(convs) - len(kept)


def converse(convs: list[Conversation], fmt: ChatFormat, generate, seed: int, progress=None,
             recorded: RecordedAnswers | None = None) -> list[ConvState]:
    """Every conversation answered turn by turn: turn k of all conversations that have it is one
    ``generate(prompts, seed)`` call (batched and length-bucketed there), or, with ``recorded``,
    the source's own answers."""
    states = [fmt.start(c) for c in convs]
    max_turns = max((len(c.turns) for c in convs), default=0)
    for k in range(max_turns):
        live = [s for s in states if len(s.conv.turns) > k]
        if k > 0:
            for s in live:
                fmt.next_turn(s, k)
        answers = (recorded(live, k, progress) if recorded is not None
                   else generate([s.ids for s in live], seed * 1009 + k, progress))
        for s, g in zip(live, answers):
            fmt.add_answer(s, g)
    for s in states:
        fmt.finish(s)
    return states
