"""Prompt templates as data, and their rendering into text segments around visual-prefix slots.

A rendered prompt is plain text holding `IMAGE` sentinels; the model splits on them and places one visual prefix per
sentinel, so few-shot prompts with several images (Med-Flamingo style) use the same path as single-image VQA.
"""

from __future__ import annotations

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
    shot_separator: str = "\n"
    stop: tuple[str, ...] = ("\n",)


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
    # Med-Flamingo's few-shot prompt (its demo script): an instruction, then per shot
    # "<image>Question: q Answer: a.<|endofchunk|>", then the query. <|endofchunk|> is a special token in
    # OpenFlamingo's tokenizer and plain text here; a generated answer stops at it or at a line break.
    "med_flamingo": Template(
        system="You are a helpful medical assistant. You are being provided with images, a question about the image "
               "and an answer. Follow the examples and answer the last question. ",
        before_question="{image}Question: {question} Answer:", after_question="Question: {question} {image} Answer:",
        shot_separator=".<|endofchunk|>", stop=("<|endofchunk|>", "\n")),
    # Mistral/Llama-2 instruction format; BOS comes from the tokenizer, EOS ends the answer.
    "mistral_instruct": Template(before_question="[INST] {image}\n{question} [/INST]",
                                 after_question="[INST] {question}\n{image} [/INST]",
                                 stop=("[INST]",), shot_separator=" "),
}


def _position(template: Template, position: str | None) -> str:
    return position or template.default_position


def render(template_name: str, question: str, *, answer: str | None = None, position: str | None = None,
           system: str | None = None, shots: Sequence[tuple[str, str]] = (), tokenizer: Any = None) -> str:
    """Render the prompt text with one IMAGE sentinel per image: each shot (question, answer) and then the query.

    With `answer`, the answer text is appended (training); without, the text ends where generation starts.
    """
    if template_name == "chat":
        return _render_chat(tokenizer, question, answer=answer, position=position, system=system, shots=shots)
    t = TEMPLATES[template_name]
    turn = getattr(t, _position(t, position))
    parts = [system if system is not None else t.system]
    for q, a in shots:
        parts.append(turn.format(image=IMAGE, question=q) + t.answer.format(answer=a) + t.shot_separator)
    parts.append(turn.format(image=IMAGE, question=question))
    text = "".join(parts)
    return text if answer is None else text + answer_text(template_name, answer)


def _render_chat(tokenizer: Any, question: str, *, answer: str | None, position: str | None, system: str | None,
                 shots: Sequence[tuple[str, str]]) -> str:
    """Use the tokenizer's own chat template; the image sentinel goes before or after the question text."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ValueError("template.name='chat' needs a tokenizer with a chat_template")

    def user(q: str) -> dict[str, str]:
        content = f"{IMAGE}\n{q}" if position in (None, "before_question") else f"{q}\n{IMAGE}"
        return {"role": "user", "content": content}

    messages = [{"role": "system", "content": system}] if system else []
    for q, a in shots:
        messages += [user(q), {"role": "assistant", "content": a}]
    messages.append(user(question))
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return prompt if answer is None else prompt + answer_text("chat", answer)


def stop_strings(template_name: str) -> list[str]:
    return list(TEMPLATES[template_name].stop) if template_name in TEMPLATES else []


def split_on_images(text: str) -> list[str]:
    """Text pieces between image slots: n sentinels give n + 1 pieces (possibly empty)."""
    return text.split(IMAGE)


def answer_text(template_name: str, answer: str) -> str:
    """The target text the loss is computed on (the template's answer format; chat templates take it verbatim)."""
    return TEMPLATES[template_name].answer.format(answer=answer) if template_name in TEMPLATES else answer
