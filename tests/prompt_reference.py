"""Reference prompt rendering for tests: the whole prompt as one text, to compare with published formats and with
the processor's token layout (the package itself renders segments only: `prefixvqa.prompts.segments`)."""

from __future__ import annotations

from typing import Any, Sequence

from prefixvqa.prompts import answer_text, segments


def render(template_name: str, question: str, *, answer: str | None = None, position: str | None = None,
           system: str | None = None, shots: Sequence[tuple[str, str]] = (), tokenizer: Any = None,
           choices: Sequence[str] = (), history: Sequence[tuple[str, str]] = ()) -> str:
    """Render the prompt text with one IMAGE sentinel per image: each shot (question, answer), then the query (after
    its conversation's earlier exchanges, `history`; their EOS tokens are the processor's and not in the text).

    With `answer`, the answer text is appended (training); without, the text ends where generation starts.
    `choices` fill the template's `{choices}` (templates without it do not show them).
    """
    text = "".join(segments(template_name, question, position=position, system=system, shots=shots, history=history,
                            tokenizer=tokenizer, choices=choices))
    return text if answer is None else text + answer_text(template_name, answer)
