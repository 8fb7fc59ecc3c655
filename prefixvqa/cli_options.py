"""The command line's vocabulary: its parser class, the values its options take, and the options several subcommands
share, so `cli.py` holds only the subcommands themselves.

An option's allowed values (`choices`) are read from the library's own registries (presets, protocols, readers,
grounding methods, dtypes, closed-question modes) the first time they are needed, to check a value or to format
`--help`: no registry name is spelled here, and building the parser imports nothing heavy.
"""

from __future__ import annotations

import argparse
import typing
from typing import Any, Callable, Iterable, Iterator


class Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (and exit 2, as argparse does), and `--debug` on every (sub)command,
    so it may also follow the subcommand (`prefixvqa train r.yaml --debug`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # SUPPRESS: a subcommand that did not see --debug leaves the value parsed before it alone
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show the full traceback of every error, also of the one-line ones")

    def error(self, message: str) -> None:  # type: ignore[override]
        """Print `prog: error: message` alone (no usage block) and exit 2, like every other error of the CLI."""
        self.exit(2, f"{self.prog}: error: {message}\n")


# ----------------------------------------------------------------------------------------- values an option takes
class Choices:
    """The allowed values of an option, read from the library's list the first time they are needed (to check a value
    or to format `--help`): the names are spelled once, in the library, and building the parser stays cheap.

    Given as both `type=` and `choices=`: as the type it refuses an unknown value with one line naming the choices.
    """

    def __init__(self, what: str, names: Callable[[], Iterable[str]]) -> None:
        self.what, self._names = what, names

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._names()))

    def __contains__(self, value: object) -> bool:
        return value in list(self._names())

    def __call__(self, text: str) -> str:
        if text not in self:
            raise argparse.ArgumentTypeError(f"unknown {self.what} {text!r}; choose from {list(self)}")
        return text


def _preset_names() -> list[str]:
    from .presets import list_presets

    return list_presets()


def _protocol_names() -> list[str]:
    from .eval.protocols import list_protocols

    return list_protocols()


def _closed_modes() -> tuple[str, ...]:
    from .eval.protocols import ClosedMode

    return typing.get_args(ClosedMode)


def _data_formats() -> list[str]:
    from .data.readers import READERS

    return sorted(READERS)


def _explain_methods() -> tuple[str, ...]:
    from .explain import METHODS

    return METHODS


def _dtypes() -> tuple[str, ...]:
    from .config import DTYPES

    return DTYPES


PRESETS = Choices("preset", _preset_names)
PROTOCOLS = Choices("protocol", _protocol_names)
CLOSED_MODES = Choices("closed-question mode", _closed_modes)
DATA_FORMATS = Choices("data format", _data_formats)
EXPLAIN_METHODS = Choices("grounding method", _explain_methods)
DTYPES = Choices("dtype", _dtypes)
DEFAULT_PROTOCOL = "llava_med"  # what `eval`, `predict` and `sweep` use unless told


def positive_int(text: str) -> int:
    """A whole number >= 1 (sizes, counts, batch sizes); refused at parse time with the value named."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def count(text: str) -> int:
    """A whole number >= 0 (0 shots: zero-shot)."""
    return 0 if text.strip() == "0" else positive_int(text)


def probability(text: str) -> float:
    """A confidence threshold in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a confidence in [0, 1], got {value}")
    return value


def train_sizes(text: str) -> list[int | str]:
    """`sweep --train-sizes`: comma-separated sizes >= 1, or "all" for the whole training set."""
    sizes: list[int | str] = []
    for part in (p.strip() for p in text.split(",")):
        if part == "all":
            sizes.append(part)
            continue
        try:
            sizes.append(positive_int(part))
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"{part!r} in {text!r}: {exc}; give sizes like 16,64,256,all") from None
    return sizes


# ------------------------------------------------------------------------------------- options several commands share
def data_args(s: argparse.ArgumentParser, required: bool = False) -> None:
    """--data/--format/--split: a dataset as every reading subcommand takes it (see `cli._data_spec`)."""
    s.add_argument("--data", required=required,
                   help="dataset path, or a JSON spec such as '{\"format\": FORMAT, \"path\": PATH}' (see --format)")
    s.add_argument("--format", type=DATA_FORMATS, choices=DATA_FORMATS, metavar="FORMAT",
                   help="the dataset's layout: %(choices)s (default: a path's file type decides)")
    s.add_argument("--split", help="split to read (train, validate, test, ...)")


def abstain_arg(s: argparse.ArgumentParser) -> None:
    """--abstain-below: the confidence under which an answer is reported as uncertain (checked to lie in [0, 1])."""
    s.add_argument("--abstain-below", type=probability, metavar="P",
                   help="answer 'uncertain' below this confidence (default: the adapter calibration's threshold)")


def protocol_arg(s: argparse.ArgumentParser, what: str) -> None:
    """--protocol: a registered evaluation protocol; `what` says what it decides for this subcommand."""
    s.add_argument("--protocol", default=DEFAULT_PROTOCOL, type=PROTOCOLS, choices=PROTOCOLS, metavar="NAME",
                   help=f"{what}: %(choices)s (default %(default)s)")


class _Selection(Choices):
    """Registered names, several of them comma-separated, or "all": the values `eval --protocol` takes."""

    def __contains__(self, value: object) -> bool:
        names = list(self._names())
        return value == "all" or (isinstance(value, str) and bool(value.strip(", ")) and
                                  all(n.strip() in names for n in value.split(",") if n.strip()))

    def __call__(self, text: str) -> str:
        if text not in self:
            names = list(self._names())
            bad = next((n.strip() for n in text.split(",") if n.strip() not in names), text)
            raise argparse.ArgumentTypeError(f"unknown {self.what} {bad!r}; choose from {names} or 'all' (several: "
                                             "comma-separated)")
        return text


PROTOCOL_SELECTION = _Selection("protocol", _protocol_names)


class _ProtocolList(argparse.Action):
    """Sets `protocols` (the names, or ["all"]) and `protocol` (the first name: what single-protocol steps such as
    calibration use)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        names = [n.strip() for n in str(values).split(",") if n.strip()]
        namespace.protocols = names
        namespace.protocol = DEFAULT_PROTOCOL if names == ["all"] else names[0]


class _RescoreArgs(argparse.Action):
    """`--rescore RESULT [OUT_DIR]`: one or two paths."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        if len(values) > 2:
            parser.error(f"argument --rescore: takes RESULT [OUT_DIR], got {len(values)} paths")
        setattr(namespace, self.dest, list(values))


def protocols_arg(s: argparse.ArgumentParser, what: str) -> None:
    """--protocol for `eval`: one registered protocol, several (comma-separated) or `all`; several give one answer
    set per prompt and one comparison table (`eval.multi`). --rescore scores a saved result under them instead."""
    s.add_argument("--protocol", default=DEFAULT_PROTOCOL, action=_ProtocolList, metavar="NAME[,NAME...]|all",
                   type=PROTOCOL_SELECTION, choices=PROTOCOL_SELECTION,
                   help=f"{what}: one or several (comma-separated) of %(choices)s, or 'all' (every one that applies; "
                        "answers generated once per prompt, one comparison table) (default %(default)s)")
    s.set_defaults(protocols=None)
    s.add_argument("--rescore", nargs="+", action=_RescoreArgs, metavar="PATH",
                   help="RESULT [OUT_DIR]: score a saved result folder or predictions.jsonl under --protocol without "
                        "the model and "
                        "print one table (written with comparison.json into OUT_DIR if given; --data optional: "
                        "records are rebuilt from the rows)")


def several_protocols(args: argparse.Namespace) -> bool:
    """`eval` was given several protocols (or `all`) or `--rescore`: the comparison path (`eval.multi`)."""
    return bool(getattr(args, "rescore", None)) or len(getattr(args, "protocols", None) or ()) > 1 or \
        getattr(args, "protocols", None) == ["all"]


def closed_mode_arg(s: argparse.ArgumentParser) -> None:
    """--closed-mode: rank a closed question's candidates or generate; default: the protocol's setting."""
    s.add_argument("--closed-mode", type=CLOSED_MODES, choices=CLOSED_MODES, metavar="MODE",
                   help="how a closed question is answered: %(choices)s (default: the protocol's)")


def method_arg(s: argparse.ArgumentParser) -> None:
    """--method: the grounding attribution that draws heatmaps (`answer --explain`, the web app)."""
    s.add_argument("--method", type=EXPLAIN_METHODS, choices=EXPLAIN_METHODS, default="occlusion", metavar="METHOD",
                   help="grounding attribution: %(choices)s (default %(default)s)")


def set_arg(s: argparse.ArgumentParser) -> None:
    """--set KEY=VALUE: a recipe override by dotted path, applied by `train.recipe.load_recipe` (one engine)."""
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value by its dotted path (repeatable), e.g. train.epochs=3")


def batch_size_arg(s: argparse.ArgumentParser, default: int | None,
                   text: str = "batch size (default %(default)s)") -> None:
    """--batch-size: items per forward pass (`text` is its help)."""
    s.add_argument("--batch-size", type=positive_int, default=default, help=text)


def max_new_tokens_arg(s: argparse.ArgumentParser) -> None:
    """--max-new-tokens: caps generation; default: the adapter's own generation settings."""
    s.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="default: the adapter's generation settings")


def metric_model_args(s: argparse.ArgumentParser) -> None:
    """--bert-model/--bert-layer/--f1-tokenizer: the encoder, layer and tokenizer some metrics score with; recorded
    with each metric's source in metrics.json (see `eval.sources`)."""
    s.add_argument("--bert-model", metavar="MODEL",
                   help="encoder of every BERTScore metric (hub id or local folder; default: bert_f1 the packaged "
                        "all-MiniLM-L6-v2, the upstream BERTScore bert-base-uncased)")
    s.add_argument("--bert-layer", type=count, metavar="N",
                   help="hidden layer BERTScore reads (default: bert_f1 the last, upstream bert_score's default for "
                        "the model, 9 for bert-base-uncased)")
    s.add_argument("--f1-tokenizer", metavar="TOKENIZER",
                   help="tokenizer of the upstream token F1 (hub id or local folder; default gpt2, as upstream)")


def metric_model_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The protocol fields `metric_model_args` set (only those given)."""
    out: dict[str, Any] = {}
    if getattr(args, "bert_model", None):
        out.update(bert_model_path=args.bert_model, bertscore_model=args.bert_model)
    if getattr(args, "bert_layer", None) is not None:
        out.update(bert_layer=args.bert_layer, bertscore_layer=args.bert_layer)
    if getattr(args, "f1_tokenizer", None):
        out["f1_tokenizer"] = args.f1_tokenizer
    return out


def few_shot_args(s: argparse.ArgumentParser) -> None:
    """--shots, --shot-pool, --feature-cache: `eval`'s few-shot answering (Med-Flamingo's protocol)."""
    s.add_argument("--shots", type=count, default=0, help="k shots per query in the template's few-shot format")
    s.add_argument("--shot-pool", default="train", metavar="train|DATA",
                   help="where shots are retrieved from: the same dataset's train split, or a dataset path/spec")
    s.add_argument("--feature-cache", help="feature cache folder for retrieval (default ~/.cache/prefixvqa/features)")


def calibration_args(s: argparse.ArgumentParser) -> None:
    """--calibrate-on, --calibrate-split, --save-calibration: `eval` fits temperature scaling first."""
    s.add_argument("--calibrate-on", metavar="DATA", help="fit temperature scaling on this dataset first")
    s.add_argument("--calibrate-split", help="fit temperature scaling on this split (of --calibrate-on or --data)")
    s.add_argument("--save-calibration", action="store_true", help="store the fitted calibration in the adapter")
