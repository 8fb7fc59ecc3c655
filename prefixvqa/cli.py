"""The `prefixvqa` command line. Errors a user can fix are printed as one line (exit 2), not a traceback; a training
run that diverged exits 1 with one line naming the step and records."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (and exit 2, as argparse does)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _train_sizes(text: str) -> list[int | str]:
    sizes: list[int | str] = []
    for part in (p.strip() for p in text.split(",")):
        if part == "all":
            sizes.append(part)
            continue
        try:
            sizes.append(_positive_int(part))
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"{part!r} in {text!r}: {exc}; give sizes like 16,64,256,all") from None
    return sizes


def _protocol(name: str) -> str:
    from .eval.protocols import list_protocols

    if name not in list_protocols():
        raise argparse.ArgumentTypeError(f"unknown protocol {name!r}; choose from {list_protocols()}")
    return name


def _data_spec(text: str, fmt: str | None, split: str | None) -> Any:
    """A path, or a JSON spec such as '{"format": "slake", "path": "Slake1.0"}'."""
    try:
        spec: Any = json.loads(text) if text.lstrip().startswith("{") else text
    except json.JSONDecodeError as exc:
        raise ValueError(f"--data is neither a path nor valid JSON: {exc.msg} at column {exc.colno} of {text!r}") \
            from None
    if fmt:
        spec = {"format": fmt, "path": text} if isinstance(spec, str) else {**spec, "format": fmt}
    if split and isinstance(spec, dict):
        spec = {**spec, "split": split}
    return spec


def _records(args: argparse.Namespace) -> list:
    from .data.readers import load_records

    return load_records(_data_spec(args.data, args.format, None), split=args.split)


def cmd_train(args: argparse.Namespace) -> int:
    from .train.recipe import load_recipe, run_recipe

    sets = [*args.set, *(["train.resume_with_changes=true"] if args.resume_with_changes else [])]
    result = run_recipe(load_recipe(args.recipe, sets), smoke=args.smoke)
    print(f"final adapter: {result.final_dir}")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from .data.cache import cache_features
    from .model import MedVQAAdapter

    records = _records(args)  # a bad --data fails before a model is loaded
    model = MedVQAAdapter.from_pretrained(args.adapter) if args.adapter else MedVQAAdapter.from_preset(args.preset)
    stats = cache_features(model, records, args.out, batch_size=args.batch_size)
    print(json.dumps(stats, indent=2, default=str))
    return 0


def cmd_answer(args: argparse.Namespace) -> int:
    from .model import MedVQAAdapter

    model = MedVQAAdapter.from_pretrained(args.adapter).eval()
    if args.choices:
        options = [c.strip() for c in args.choices.split(",")]
        probs = model.score_choices([args.image], [args.question], [options])[0]
        for option, p in sorted(zip(options, probs), key=lambda x: -x[1]):
            print(f"{p:.3f}  {option}")
        return 0
    answer = model.answer([args.image], [args.question], max_new_tokens=args.max_new_tokens,
                          num_beams=args.num_beams)[0]
    print(answer.text)
    print(f"(log-probability {answer.score:.3f} over {answer.num_tokens} tokens)", file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval.runner import compare, evaluate

    if args.compare:
        print(compare(args.compare))
        return 0
    if not (args.adapter and args.data):
        raise ValueError("prefixvqa eval needs --adapter and --data (or --compare A B ...)")
    from .model import MedVQAAdapter

    records = _records(args)  # a bad --data fails before a model is loaded
    model = MedVQAAdapter.from_pretrained(args.adapter).eval()
    from .eval.protocols import get_protocol

    protocol = get_protocol(args.protocol, upstream_metrics=True) if args.upstream_metrics else args.protocol
    metrics = evaluate(model, records, protocol, args.out, batch_size=args.batch_size,
                       closed_mode=args.closed_mode, data_spec=_data_spec(args.data, args.format, args.split),
                       adapter_path=args.adapter)
    print(json.dumps(metrics, indent=2, sort_keys=True))
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .eval.sweep import sweep

    result = sweep(args.recipe, train_sizes=args.train_sizes, seeds=args.seeds, out_dir=args.out,
                   protocol=args.protocol, sets=args.set, smoke=args.smoke)
    print(json.dumps(result["summary"], indent=2, default=str))
    print(f"learning curve: {Path(args.out) / 'learning_curve.png'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    given = {k: getattr(args, k) for k in ("n_train", "n_test", "epochs", "seed") if getattr(args, k) is not None}
    run_demo(args.out, **given)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_merged
    from .model import MedVQAAdapter

    if not args.merge:
        raise ValueError("prefixvqa export needs --merge: the adapter folder itself is already the shareable unit; "
                         "--merge writes a merged full-precision decoder + mapper + processor loadable without peft")
    folder, caveat = export_merged(MedVQAAdapter.from_pretrained(args.adapter), args.out, args.dtype)
    print(f"merged export: {folder} (decoder in {folder / 'decoder'}; load with MedVQAAdapter.from_pretrained)")
    if caveat:
        print(f"precision: {caveat}", file=sys.stderr)
    return 0


def cmd_fit_check(args: argparse.Namespace) -> int:
    from .fitcheck import fit_check
    from .train.recipe import load_recipe

    reports = fit_check(load_recipe(args.recipe, args.set), args.gpu_mem, stage=args.stage,
                        batch_size=args.batch_size, text_len=args.text_len, answer_len=args.answer_len,
                        num_processes=args.num_processes, decoder_config=args.decoder_config,
                        encoder_config=args.encoder_config, reserve=args.reserve)
    if args.json:
        print(json.dumps([r.to_dict() for r in reports], indent=2))
    else:
        print("\n\n".join(r.format() for r in reports))
    return 0 if all(r.fits is not False for r in reports) else 1


def cmd_presets(args: argparse.Namespace) -> int:
    from .presets import list_presets, preset_info

    for name in list_presets():
        print(f"{name:<28} {preset_info(name).get('description', '')[:90]}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="prefixvqa", description="Vision-language prefix adapters for medical VQA.")
    sub = p.add_subparsers(dest="command", required=True)

    def data_args(s: argparse.ArgumentParser, required: bool = False) -> None:
        s.add_argument("--data", required=required, help="dataset path or JSON spec, e.g. '{\"format\": \"slake\", "
                                                      "\"path\": \"Slake1.0\"}'")
        s.add_argument("--format", help="reader: vqa_rad, slake, pathvqa, pmc_vqa, llava, llava_med_eval, report, "
                                                "iu_xray, generic")
        s.add_argument("--split", help="split to read (train, validate, test, ...)")

    s = sub.add_parser("train", help="train from a YAML recipe (single stage or curriculum)")
    s.add_argument("recipe")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    s.add_argument("--smoke", action="store_true", help="apply the recipe's tiny offline smoke override")
    s.add_argument("--resume-with-changes", action="store_true",
                   help="resume although settings that change the result differ from the checkpoint's")
    s.set_defaults(func=cmd_train)

    s = sub.add_parser("cache-features", help="encode images once into the memory-mapped feature cache")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--adapter")
    g.add_argument("--preset")
    data_args(s, required=True)
    s.add_argument("--out", required=True, help="cache folder")
    s.add_argument("--batch-size", type=_positive_int, default=32)
    s.set_defaults(func=cmd_cache)

    s = sub.add_parser("answer", help="answer one question about one image")
    s.add_argument("--adapter", required=True)
    s.add_argument("--image", required=True, help="PNG/JPEG/TIFF/DICOM/NIfTI file")
    s.add_argument("question")
    s.add_argument("--choices", help="comma-separated candidates to rank instead of generating")
    s.add_argument("--max-new-tokens", type=_positive_int, default=None,
                   help="default: the adapter's generation settings")
    s.add_argument("--num-beams", type=_positive_int, default=None, help="default: the adapter's generation settings")
    s.set_defaults(func=cmd_answer)

    s = sub.add_parser("eval", help="evaluate an adapter under a named protocol, or compare results")
    s.add_argument("--adapter")
    data_args(s)
    s.add_argument("--protocol", default="llava_med", type=_protocol,
                   help="llava_med, prefix_vqa, med_flamingo, pmc_vqa, report")
    s.add_argument("--out", default="runs/eval")
    s.add_argument("--batch-size", type=_positive_int, default=8)
    s.add_argument("--closed-mode", choices=["score", "generate"])
    s.add_argument("--upstream-metrics", action="store_true",
                   help="also report the source's own metric variants (prefix_vqa: van Sonsbeek's nltk BLEU etc.)")
    s.add_argument("--compare", nargs="+", metavar="METRICS_JSON", help="print a side-by-side table")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("sweep", help="few-shot learning curve: train and evaluate at several training-set sizes")
    s.add_argument("recipe")
    s.add_argument("--train-sizes", default="16,64,256,all", type=_train_sizes)
    s.add_argument("--seeds", type=_positive_int, default=3)
    s.add_argument("--protocol", default="llava_med", type=_protocol)
    s.add_argument("--out", default="runs/sweep")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--smoke", action="store_true")
    s.set_defaults(func=cmd_sweep)

    s = sub.add_parser("demo", help="offline demo: train and evaluate on real DICOM + generated lesions (SmolLM2)")
    s.add_argument("--out", default="checkpoints/demo")
    s.add_argument("--n-train", type=_positive_int, help="generated lesion training questions (default: run_demo's)")
    s.add_argument("--n-test", type=_positive_int, help="generated lesion held-out questions")
    s.add_argument("--epochs", type=_positive_int)
    s.add_argument("--seed", type=int)
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("export", help="write a merged full-precision decoder + mapper + processor (no peft needed)")
    s.add_argument("adapter")
    s.add_argument("--merge", action="store_true", help="fold LoRA into the decoder (dequantising a 4/8-bit base)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="merged weights' dtype (default: the adapter's decoder.dtype)")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("fit-check", help="predict a recipe's training-step GPU memory before loading anything "
                                         "(exit status 1 when a stage does not fit)")
    s.add_argument("recipe")
    s.add_argument("--gpu-mem", help="GPU memory to fit in, e.g. 11GB (GB = GiB = 2^30 bytes)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    s.add_argument("--stage", help="one curriculum stage (default: every stage)")
    s.add_argument("--batch-size", type=int, help="per-process batch (default: the recipe's)")
    s.add_argument("--text-len", type=int, help="text tokens per sample (default: template.max_length)")
    s.add_argument("--answer-len", type=int, default=32, help="supervised tokens per sample (default 32)")
    s.add_argument("--num-processes", type=int, help="processes sharing the model under fsdp/deepspeed")
    s.add_argument("--decoder-config", help="a transformers config.json when the decoder's is not available")
    s.add_argument("--encoder-config", help="an open_clip model config JSON when the encoder's is not available")
    s.add_argument("--reserve", default="0.75GB", help="CUDA context + allocator slack added before comparing")
    s.add_argument("--json", action="store_true", help="print the reports as JSON")
    s.set_defaults(func=cmd_fit_check)

    s = sub.add_parser("presets", help="list the named adapter presets")
    s.set_defaults(func=cmd_presets)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    from .adapter_io import AdapterLoadError
    from .config import ConfigError
    from .data.records import DataError
    from .train.checkpoint import RunLockedError
    from .train.trainer import TrainingDiverged
    from .vision import ModelNotAvailableError

    def say(exc: BaseException) -> None:
        text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or exc.__class__.__name__
        print(f"prefixvqa {args.command}: error: {text}", file=sys.stderr)

    try:
        return args.func(args)
    except TrainingDiverged as exc:  # not a usage error: the run itself failed
        say(exc)
        return 1
    except (ConfigError, DataError, ModelNotAvailableError, AdapterLoadError, RunLockedError, ImportError,
            ValueError, OSError) as exc:  # OSError: missing files, a recipe folder, a full disk (the path is named)
        say(exc)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
