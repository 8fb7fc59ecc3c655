"""Prompt templates as data, and their rendering into text segments around visual-prefix slots.

A rendered prompt is plain text holding `IMAGE` sentinels; the model splits on them and places one visual prefix per
sentinel, so few-shot prompts with several images (Med-Flamingo style) use the same path as single-image VQA.
A conversation (LLaVA-style multi-turn record) renders as alternating prompt and answer texts (`segments`): the image
in its first question, later questions in the template's text-only user turn, every answer a training target.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

IMAGE = "<|prefixvqa_image|>"


@dataclass(frozen=True)
class Template:
    """`before_question` / `after_question`: the user turn with `{image}` and `{question}`; `answer`: the target."""

    before_question: str
    after_question: str
    answer: str = " {answer}"
    system: str = ""
    default_position: str = "before_question"
    shot_separator: str = "\n"  # also joins the exchanges of a conversation
    stop: tuple[str, ...] = ("\n",)
    text_turn: str | None = None  # a user turn without an image (a conversation's later questions); None: derived


TEMPLATES: dict[str, Template] = {
    # Minimal QA layout, used by ClipCap-style and demo adapters.
    "plain": Template(before_question="{image}Question: {question} Answer:",
                      after_question="Question: {question} {image} Answer:"),
    # van Sonsbeek et al. 2023: question first, the visual prefix as context, then the answer.
    "prefix_vqa": Template(before_question="context: {image} question: {question} answer:",
                           after_question="question: {question} context: {image} answer:",
                           default_position="after_question"),
    # LLaVA-Med's "###"-separated conversation.
    "llava_med_v1": Template(
        system="A chat between a curious human and an artificial intelligence assistant. "
               "The assistant gives helpful, detailed, and polite answers to the human's questions.\n",
        before_question="### Human: {image}\n{question}\n### Assistant:",
        after_question="### Human: {question}\n{image}\n### Assistant:",
        stop=("###",), shot_separator="\n"),
    # Mistral/Llama-2 instruction format; BOS comes from the tokenizer, EOS ends the answer.
    "mistral_instruct": Template(before_question="[INST] {image}\n{question} [/INST]",
                                 after_question="[INST] {question}\n{image} [/INST]",
                                 stop=("[INST]",), shot_separator=" "),
}


def _position(template: Template, position: str | None) -> str:
    return position or template.default_position


def text_turn(template: Template) -> str:
    """The user turn of a conversation's later questions, which carry no image: the template's `text_turn`, or its
    before_question layout without `{image}` and the whitespace after it ("### Human: {question}\n### Assistant:")."""
    if template.text_turn is not None:
        return template.text_turn
    return re.sub(r"\{image\}[ \t]*\n?", "", template.before_question)


def segments(template_name: str, question: str, *, position: str | None = None, system: str | None = None,
             shots: Sequence[tuple[str, str]] = (), history: Sequence[tuple[str, str]] = (),
             tokenizer: Any = None) -> list[str]:
    """The prompt as [prompt, answer, prompt, answer, ..., prompt]: one (prompt, answer) per earlier exchange of a
    conversation (`history`), then the query's prompt. Answers are target texts (`answer_text`); the processor ends
    each with EOS. IMAGE sentinels: one per shot and one in the conversation's first question."""
    if template_name == "chat":
        return _chat_segments(tokenizer, question, position=position, system=system, shots=shots, history=history)
    t = TEMPLATES[template_name]
    turn = getattr(t, _position(t, position))
    parts = [system if system is not None else t.system]
    for q, a in shots:
        parts.append(turn.format(image=IMAGE, question=q) + t.answer.format(answer=a) + t.shot_separator)
    out, text = [], "".join(parts)
    for k, (q, a) in enumerate([*history, (question, None)]):
        text += (t.shot_separator if k else "") + (turn if k == 0 else text_turn(t)).format(image=IMAGE, question=q)
        if a is None:
            break
        out += [text, answer_text(template_name, a)]
        text = ""
    return out + [text]


def render(template_name: str, question: str, *, answer: str | None = None, position: str | None = None,
           system: str | None = None, shots: Sequence[tuple[str, str]] = (), history: Sequence[tuple[str, str]] = (),
           tokenizer: Any = None) -> str:
    """Render the prompt text with one IMAGE sentinel per image: each shot (question, answer), then the query (after
    its conversation's earlier exchanges, `history`).

    With `answer`, the answer text is appended (training); without, the text ends where generation starts.
    """
    text = "".join(segments(template_name, question, position=position, system=system, shots=shots, history=history,
                            tokenizer=tokenizer))
    return text if answer is None else text + answer_text(template_name, answer)


def _chat_segments(tokenizer: Any, question: str, *, position: str | None, system: str | None,
                   shots: Sequence[tuple[str, str]], history: Sequence[tuple[str, str]]) -> list[str]:
    """`segments` through the tokenizer's own chat template; the image sentinel goes before or after the question
    text. Each answer's closing EOS text is left to the processor's EOS token (so the ids are the template's)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("template.name='chat' needs a tokenizer with a chat_template")

    def user(q: str, image: bool = True) -> dict[str, str]:
        content = q if not image else f"{IMAGE}\n{q}" if position in (None, "before_question") else f"{q}\n{IMAGE}"
        return {"role": "user", "content": content}

    def apply(messages: list[dict[str, str]], generation: bool) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    messages = [{"role": "system", "content": system}] if system else []
    for q, a in shots:
        messages += [user(q), {"role": "assistant", "content": a}]
    unstable = ValueError("the tokenizer's chat template renders an earlier turn differently once a later one is "
                          "added, so a conversation cannot be split into turns; use a named template for multi-turn "
                          "records")
    out, done = [], ""
    for k, (q, a) in enumerate([*history, (question, None)]):
        messages.append(user(q, image=k == 0))
        prompt = apply(messages, True)
        if not prompt.startswith(done):
            raise unstable
        if a is None:
            return out + [prompt[len(done):]]
        messages.append({"role": "assistant", "content": a})
        full = apply(messages, False)
        if not full.startswith(prompt + a):
            raise unstable
        out += [prompt[len(done):], a]
        done = prompt + a
        eos = getattr(tokenizer, "eos_token", None)
        if eos and full[len(done):].startswith(eos):
            done += eos
    raise AssertionError("unreachable")


def stop_strings(template_name: str) -> list[str]:
    return list(TEMPLATES[template_name].stop) if template_name in TEMPLATES else []


def split_on_images(text: str) -> list[str]:
    """Text pieces between image slots: n sentinels give n + 1 pieces (possibly empty)."""
    return text.split(IMAGE)


def answer_text(template_name: str, answer: str) -> str:
    """The target text the loss is computed on (the template's answer format; chat templates take it verbatim)."""
    return TEMPLATES[template_name].answer.format(answer=answer) if template_name in TEMPLATES else answer
