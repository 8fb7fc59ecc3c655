"""Prompt templates as data, and their rendering into text segments around visual-prefix slots.

`TEMPLATES` is the one registry of template names (config validation and the CLI read it): the named text layouts,
and "chat", the tokenizer's own chat template (`ChatTemplate`).

A rendered prompt is plain text holding `IMAGE` sentinels; the model splits on them and places one visual prefix per
sentinel, so few-shot prompts with several images (Med-Flamingo style) use the same path as single-image VQA.
A conversation (LLaVA-style multi-turn record) renders as alternating prompt and answer texts (`segments`): the image
in its first question, later questions in the template's text-only user turn, every answer a training target.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

from .errors import ConfigError

IMAGE = "<|prefixvqa_image|>"


@dataclass(frozen=True)
class Template:
    """One prompt format. `before_question` / `after_question`: the user turn with `{image}` and `{question}` (and
    `{choices}`, the record's options each written as `choice`); `answer`: the target text; `eos`: whether the
    tokenizer's EOS ends the target (formats that end turns with text, like LLaVA-Med's `###`, do not)."""

    before_question: str
    after_question: str
    answer: str = " {answer}"
    system: str = ""
    default_position: str = "before_question"
    shot_separator: str = "\n"
    stop: tuple[str, ...] = ("\n",)
    eos: bool = True
    choice: str = " {letter}:{text}"
    image_before_start: bool = False  # a leading image goes before the start tokens (BOS), as MedVInT built it
    text_turn: str | None = None  # a user turn without an image (a conversation's later questions); None: derived
    #: True where the layout comes from the tokenizer (`ChatTemplate`), so rendering needs a tokenizer with one
    uses_tokenizer_template: ClassVar[bool] = False

    def segments(self, question: str, *, position: str | None = None, system: str | None = None,
                 shots: Sequence[tuple[str, str]] = (), history: Sequence[tuple[str, str]] = (),
                 tokenizer: Any = None, choices: Sequence[str] = ()) -> list[str]:
        """The prompt as [prompt, answer, ..., prompt] for this layout: see the module function `segments`."""
        turn = getattr(self, position or self.default_position)
        parts = [system if system is not None else self.system]
        for q, a in shots:
            parts.append(turn.format(image=IMAGE, question=q, choices="") + self.answer_text(a) + self.shot_separator)
        out, text = [], "".join(parts)
        joiner = "" if self.eos else self.shot_separator
        for k, (q, a) in enumerate([*history, (question, None)]):
            listed = self.format_choices(choices) if a is None else ""
            text += (joiner if k else "") + (turn if k == 0 else text_turn(self)).format(image=IMAGE, question=q,
                                                                                        choices=listed)
            if a is None:
                break
            out += [text, self.answer_text(a)]
            text = ""
        return out + [text]

    def answer_text(self, answer: str) -> str:
        """The target text the loss is computed on: the answer in the template's answer format."""
        return self.answer.format(answer=answer)

    def format_choices(self, choices: Sequence[str]) -> str:
        """The options as this template lists them (" A:text B:text ..."; a letter already on one is not doubled)."""
        return "".join(self.choice.format(letter=chr(ord("A") + i), text=strip_choice_letter(c))
                       for i, c in enumerate(choices))


@dataclass(frozen=True)
class ChatTemplate(Template):
    """The tokenizer's own chat template ("chat"): the user message holds the image sentinel before or after the
    question (`before_question` / `after_question` give that layout); the answer is taken verbatim and closed by the
    tokenizer's EOS. Rendering needs a tokenizer with a `chat_template`, and no few-shot separator applies."""

    before_question: str = "{image}\n{question}"
    after_question: str = "{question}\n{image}"
    answer: str = "{answer}"
    stop: tuple[str, ...] = ()
    text_turn: str | None = "{question}"
    uses_tokenizer_template: ClassVar[bool] = True

    def segments(self, question: str, *, position: str | None = None, system: str | None = None,
                 shots: Sequence[tuple[str, str]] = (), history: Sequence[tuple[str, str]] = (),
                 tokenizer: Any = None, choices: Sequence[str] = ()) -> list[str]:
        """`segments` through the tokenizer's chat template (choices are not listed: the template has no place)."""
        return _chat_segments(self, tokenizer, question, position=position, system=system, shots=shots,
                              history=history)


TEMPLATES: dict[str, Template] = {
    # The tokenizer's own chat template (SmolLM2, Qwen, Llama-3 instruct ...): sentinel beside the question.
    # Minimal QA layout, used by the demo.
    "plain": Template(before_question="{image}Question: {question} Answer:",
                      after_question="Question: {question} {image} Answer:"),
    # ClipCap: the prefix, then the caption; generation stops at the first "." (their stop token), no EOS trained.
    "clipcap": Template(before_question="{image}", after_question="{image}", answer="{answer}", stop=(".",),
                        eos=False),
    # LLaVA's "plain" alignment format (LLaVA-Rad stage 1): the image, then the caption/findings and "\n".
    "llava_plain": Template(before_question="{image}", after_question="{image}", answer="{answer}\n", eos=False),
    # van Sonsbeek et al. 2023 (open-ended-medical-vqa, vqaloader.py): "question: Q context:" + prefix + "answer " + A
    # + EOS. The space before A is tokenised with A (upstream tokenised "answer " and A separately; same characters).
    "prefix_vqa": Template(before_question="{image}question: {question} answer",
                           after_question="question: {question} context:{image}answer",
                           default_position="after_question", stop=()),
    # LLaVA-Med v1.0 training format (llava/train/train.py, version v0): system, blank line, then per turn
    # "### Human: ...\n" / "### Assistant: ...\n", closed by "###"; no EOS is trained, generation stops at "###".
    "llava_med_v1": Template(
        system="A chat between a curious human and an artificial intelligence assistant. "
               "The assistant gives helpful, detailed, and polite answers to the human's questions.\n\n### ",
        before_question="Human: {image}\n{question}\n### Assistant:",
        after_question="Human: {question}\n{image}\n### Assistant:",
        answer=" {answer}\n###", stop=("###",), shot_separator=" ", eos=False),
    # Vicuna v1 (LLaVA-Rad's conv_vicuna_v1): "SYSTEM USER: <image>\nQ ASSISTANT: A</s>".
    "vicuna_v1": Template(
        system="A chat between a curious user and an artificial intelligence assistant. "
               "The assistant gives helpful, detailed, and polite answers to the user's questions. ",
        before_question="USER: {image}\n{question} ASSISTANT:", after_question="USER: {question}\n{image} ASSISTANT:",
        stop=(), shot_separator="</s>"),
    # MedVInT-TD (PMC-VQA, PMC_QA_Dataset.py): the visual queries, then "Question: Q Choices: A:.. B:.. The Answer is:".
    "medvint": Template(before_question="{image}Question: {question} Choices:{choices} The Answer is:",
                        after_question="Question: {question} Choices:{choices} The Answer is:{image}", stop=(),
                        image_before_start=True),
    # Med-Flamingo (scripts/demo.py): system line, then per shot "<image>Question: Q Answer: A.<|endofchunk|>".
    "med_flamingo": Template(
        system="You are a helpful medical assistant. You are being provided with images, a question about the image "
               "and an answer. Follow the examples and answer the last question. ",
        before_question="{image}Question: {question} Answer:", after_question="Question: {question} {image}Answer:",
        answer=" {answer}.<|endofchunk|>", stop=("<|endofchunk|>",), shot_separator="", eos=False),
    # Mistral/Llama-2 instruction format; BOS comes from the tokenizer, EOS ends the answer.
    "mistral_instruct": Template(before_question="[INST] {image}\n{question} [/INST]",
                                 after_question="[INST] {question}\n{image} [/INST]",
                                 stop=("[INST]",), shot_separator=" "),
    # Gemma 3 / MedGemma (the tokenizer's chat template + Gemma3Processor): BOS from the tokenizer, the user turn with
    # the image where the processor expands `<start_of_image>` ("\n\n<start_of_image>" + image tokens +
    # "<end_of_image>\n\n"), the answer closed by `<end_of_turn>` (generation_config's second EOS).
    "gemma3": Template(
        before_question="<start_of_turn>user\n\n\n<start_of_image>{image}<end_of_image>\n\n{question}<end_of_turn>\n"
                        "<start_of_turn>model\n",
        after_question="<start_of_turn>user\n{question}\n\n<start_of_image>{image}<end_of_image>\n\n<end_of_turn>\n"
                       "<start_of_turn>model\n",
        text_turn="<start_of_turn>user\n{question}<end_of_turn>\n<start_of_turn>model\n",
        answer="{answer}<end_of_turn>\n", stop=("<end_of_turn>",), shot_separator="", eos=False),
    # The tokenizer's own chat template (SmolLM2, Qwen, Llama-3 instruct ...): the sentinel beside the question.
    "chat": ChatTemplate(),
}

#: LLaVA-Rad's report prompt (llava/utils.py), with and without the study's indication.
REPORT_PROMPT = "Provide a description of the findings in the radiology image given the following indication: {}"
REPORT_PROMPT_NO_INDICATION = "Provide a description of the findings in the radiology image."
_LETTERED = re.compile(r"^\s*\(?[A-Za-z][).:]\s*")


def report_question(indication: str | None) -> str:
    """The question a report-generation record asks (LLaVA-Rad's wording; line breaks in the indication joined)."""
    indication = " ".join((indication or "").split())
    return REPORT_PROMPT.format(indication) if indication else REPORT_PROMPT_NO_INDICATION


def get_template(name: str) -> Template:
    """The registered template of that name; an unknown name is a ConfigError listing the registry."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ConfigError(f"template.name={name!r} is not one of {sorted(TEMPLATES)}") from None


def format_choices(template_name: str, choices: Sequence[str]) -> str:
    """The options as the template lists them: " A:text B:text ..." (a letter already on an option is not doubled)."""
    return get_template(template_name).format_choices(choices)


def strip_choice_letter(choice: str) -> str:
    """An option without the letter it may carry ("A:text", "(b) text", "C. text" -> "text")."""
    return _LETTERED.sub("", choice)


def text_turn(template: Template) -> str:
    """The user turn of a conversation's later questions, which carry no image: the template's `text_turn`, or its
    before_question layout without `{image}` and the whitespace after it ("Human: {question}\n### Assistant:")."""
    if template.text_turn is not None:
        return template.text_turn
    return re.sub(r"\{image\}[ \t]*\n?", "", template.before_question)


def segments(template_name: str, question: str, *, position: str | None = None, system: str | None = None,
             shots: Sequence[tuple[str, str]] = (), history: Sequence[tuple[str, str]] = (), tokenizer: Any = None,
             choices: Sequence[str] = ()) -> list[str]:
    """The prompt as [prompt, answer, prompt, answer, ..., prompt]: one (prompt, answer) per earlier exchange of a
    conversation (`history`), then the query's prompt. Answers are target texts (`answer_text`), each closed by EOS
    where the template ends answers with it (`ends_with_eos`; the processor adds it). An exchange follows an EOS-ended
    answer directly (Vicuna's "</s>USER:"), else after the template's shot separator (LLaVA-Med's "\n### Human:").
    IMAGE sentinels: one per shot and one in the conversation's first question; `choices` go to the query."""
    return get_template(template_name).segments(question, position=position, system=system, shots=shots,
                                                history=history, tokenizer=tokenizer, choices=choices)


def _chat_segments(template: ChatTemplate, tokenizer: Any, question: str, *, position: str | None,
                   system: str | None, shots: Sequence[tuple[str, str]], history: Sequence[tuple[str, str]]
                   ) -> list[str]:
    """`segments` through the tokenizer's own chat template; the image sentinel goes before or after the question
    text. Each answer's closing EOS text is left to the processor's EOS token (so the ids are the template's)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise ConfigError("template.name='chat' needs a tokenizer with a chat_template")
    layout = getattr(template, position or template.default_position)

    def user(q: str, image: bool = True) -> dict[str, str]:
        content = (layout if image else text_turn(template)).format(image=IMAGE, question=q)
        return {"role": "user", "content": content}

    def apply(messages: list[dict[str, str]], generation: bool) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)

    messages = [{"role": "system", "content": system}] if system else []
    for q, a in shots:
        messages += [user(q), {"role": "assistant", "content": a}]
    unstable = ConfigError("the tokenizer's chat template renders an earlier turn differently once a later one is "
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
    """Texts that end a generated answer under the template (its turn marker, e.g. "###"); none for "chat", whose
    answers end with the tokenizer's EOS."""
    return list(get_template(template_name).stop)


def split_on_images(text: str) -> list[str]:
    """Text pieces between image slots: n sentinels give n + 1 pieces (possibly empty)."""
    return text.split(IMAGE)


def image_before_start(template_name: str) -> bool:
    """Whether a leading image goes before the start tokens (BOS), as MedVInT built its input; others put BOS first."""
    return get_template(template_name).image_before_start


def ends_with_eos(template_name: str) -> bool:
    """Whether the tokenizer's EOS closes the target (chat templates: yes)."""
    return get_template(template_name).eos


def answer_text(template_name: str, answer: str) -> str:
    """The target text the loss is computed on (the template's answer format; chat templates take it verbatim)."""
    return get_template(template_name).answer_text(answer)
