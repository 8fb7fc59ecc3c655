"""The `prefixvqa` command line (also `python -m prefixvqa`): one `_add_<command>` function per subcommand declares
its options beside the `cmd_<command>` handler that runs it; the shared options, value types and registry-read
choices are in `cli_options`.

A `PrefixVQAError` (bad input, missing file, refused operation) prints one line `prefixvqa <command>: error: ...`
and exits 2 (1 for a training run that diverged: the run failed, not its input); so do the machine's own errors (an
`OSError` naming its path, a missing optional package). Anything else is a bug and keeps its traceback; `--debug`
shows the traceback of every error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from . import cli_options as opt
from .cli_hub import add_hub
from ._version import __version__
from .errors import ConfigError, PrefixVQAError


def _data_spec(text: str, fmt: str | None, split: str | None) -> Any:
    """A path, or a JSON spec such as '{"format": "slake", "path": "Slake1.0"}'."""
    from .data.records import DataError

    try:
        spec: Any = json.loads(text) if text.lstrip().startswith("{") else text
    except json.JSONDecodeError as exc:
        raise DataError(f"--data is neither a path nor valid JSON: {exc.msg} at column {exc.colno} of {text!r}") \
            from None
    if fmt:
        spec = {"format": fmt, "path": text} if isinstance(spec, str) else {**spec, "format": fmt}
    if split and isinstance(spec, dict):
        spec = {**spec, "split": split}
    return spec


def _records(args: argparse.Namespace) -> list:
    from .data.readers import load_records

    return load_records(_data_spec(args.data, args.format, None), split=args.split)


# ------------------------------------------------------------------------------------------------------ train
def _add_train(sub: Any) -> None:
    s = sub.add_parser("train", help="train from a YAML recipe (single stage or curriculum)")
    s.add_argument("recipe")
    opt.set_arg(s)
    s.add_argument("--smoke", action="store_true", help="apply the recipe's tiny offline smoke override")
    s.add_argument("--resume-with-changes", action="store_true",
                   help="resume although settings that change the result differ from the checkpoint's")
    s.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    """`prefixvqa train`: run a recipe (every curriculum stage) and name the final adapter folder."""
    from .train.recipe import load_recipe, run_recipe

    sets = [*args.set, *(["train.resume_with_changes=true"] if args.resume_with_changes else [])]
    result = run_recipe(load_recipe(args.recipe, sets), smoke=args.smoke)  # a signal's stop: see main()
    print(f"final adapter: {result.final_dir}")
    return 0


# ------------------------------------------------------------------------------------------------ cache-features
def _add_cache(sub: Any) -> None:
    s = sub.add_parser("cache-features", help="encode images once into the memory-mapped feature cache")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--adapter", help="adapter folder or hub name[@version] whose encoder encodes")
    g.add_argument("--preset", type=opt.PRESETS, choices=opt.PRESETS, metavar="NAME",
                   help="a named preset's encoder: %(choices)s")
    opt.data_args(s, required=True)
    s.add_argument("--out", required=True, help="cache folder")
    opt.batch_size_arg(s, 32, "images per encoder batch (default %(default)s)")
    s.set_defaults(func=cmd_cache)


def cmd_cache(args: argparse.Namespace) -> int:
    """`prefixvqa cache-features`: encode a dataset's images once so training and retrieval skip the encoder. `--out`
    is new, empty or a feature cache already (entries are only ever added to it)."""
    from .data.cache import cache_features
    from .fileio import holds_only, refuse_foreign
    from .model import MedVQAAdapter

    records = _records(args)  # a bad --data, or an --out of the user's, fails before a model is loaded
    refuse_foreign(Path(args.out), holds_only("[0-9a-f]" * 16), "a feature cache (only folders named by encoder)")
    model = MedVQAAdapter.from_pretrained(args.adapter) if args.adapter else MedVQAAdapter.from_preset(args.preset)
    stats = cache_features(model, records, args.out, batch_size=args.batch_size)
    print(json.dumps(stats, indent=2, default=str))
    return 0


# ---------------------------------------------------------------------------------------------------------- answer
def _add_answer(sub: Any) -> None:
    s = sub.add_parser("answer", help="answer one question about one image")
    s.add_argument("--adapter", required=True, help="adapter folder or hub name[@version]")
    s.add_argument("--image", required=True, help="PNG/JPEG/TIFF/DICOM/NIfTI file")
    s.add_argument("question")
    s.add_argument("--choices", help="comma-separated candidates to rank instead of generating")
    opt.max_new_tokens_arg(s)
    s.add_argument("--num-beams", type=opt.positive_int, default=None,
                   help="default: the adapter's generation settings")
    opt.abstain_arg(s)
    s.add_argument("--explain", nargs="?", const="", metavar="PNG",
                   help="write a grounding heatmap overlay (default: <image>_explain.png)")
    opt.method_arg(s)
    s.set_defaults(func=cmd_answer)


def cmd_answer(args: argparse.Namespace) -> int:
    """`prefixvqa answer`: one answer (or ranked choices) with its confidence, optionally a grounding heatmap."""
    from .calibration import abstains
    from .explain import explain, explain_target
    from .model import MedVQAAdapter
    from .ood import warning_line

    out = explain_target(args.explain, args.image) if args.explain is not None else None  # refused before loading
    model = MedVQAAdapter.from_pretrained(args.adapter).eval()
    threshold = _threshold(args, model)
    if args.choices:
        options = [c.strip() for c in args.choices.split(",")]
        probs = model.score_choices([args.image], [args.question], [options])[0]
        for option, p in sorted(zip(options, probs), key=lambda x: -x[1]):
            print(f"{p:.3f}  {option}")
        if abstains(max(probs), threshold, probs.ood):
            print(f"uncertain (best choice below the confidence threshold {threshold:.2f}, or an unfamiliar image)")
        if probs.ood:
            print(warning_line(model.image_summary, probs))
        return 0
    answer = model.answer([args.image], [args.question], max_new_tokens=args.max_new_tokens,
                          num_beams=args.num_beams, abstain_below=threshold)[0]
    print(answer.text + (f"\n{warning_line(model.image_summary, answer)}" if answer.ood else ""))
    guess = f"best guess {answer.guess!r}, " if answer.abstained else ""
    print(f"({guess}confidence {answer.confidence:.3f}{'' if model.calibration else ' uncalibrated'}; "
          f"log-probability {answer.score:.3f} over {answer.num_tokens} tokens)", file=sys.stderr)
    if out is not None:
        explain(model, args.image, args.question, out, method=args.method, answer=answer)  # the printed answer
        print(f"grounding heatmap ({args.method}): {out}", file=sys.stderr)
    return 0


def _threshold(args: argparse.Namespace, model: Any) -> float | None:
    """--abstain-below (checked to lie in [0, 1] by the parser), else the adapter calibration's threshold, else none."""
    from .calibration import abstention_threshold

    return abstention_threshold(getattr(args, "abstain_below", None), model.calibration, "--abstain-below")


# ------------------------------------------------------------------------------------------------------------ eval
def _add_eval(sub: Any) -> None:
    s = sub.add_parser("eval", help="evaluate an adapter under a named protocol, or compare results")
    s.add_argument("--adapter", help="adapter folder or hub name[@version]")
    opt.data_args(s)
    opt.protocols_arg(s, "evaluation protocol")
    s.add_argument("--out", default="runs/eval", help="results folder (default %(default)s)")
    opt.batch_size_arg(s, 8)
    opt.closed_mode_arg(s)
    s.add_argument("--upstream-metrics", action="store_true",
                   help="also report the source's own (uncorrected) metric variants by name, where the protocol "
                        "defines them")
    s.add_argument("--compare", nargs="+", metavar="METRICS_JSON", help="print a side-by-side table")
    opt.metric_model_args(s)
    opt.few_shot_args(s)
    opt.calibration_args(s)
    opt.abstain_arg(s)
    s.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    """`prefixvqa eval`: metrics and a report for an adapter on a dataset (few-shot and calibration optional), or
    `--compare` to tabulate earlier results."""
    from .eval import multi  # several protocols (or --rescore): one answer set per prompt, one comparison table
    from .eval.protocols import get_protocol
    from .eval.runner import compare, evaluate

    if args.compare or args.rescore:
        print(compare(args.compare) if args.compare else multi.rescore_cli(args, _records(args) if args.data else None))
        return 0
    if not (args.adapter and args.data):
        raise ConfigError("prefixvqa eval needs --adapter and --data (or --compare A B ...)")
    from .model import MedVQAAdapter

    records, several = _records(args), opt.several_protocols(args)  # a bad --data or --out fails before loading
    multi.check_out(args.out, several)
    model = MedVQAAdapter.from_pretrained(args.adapter).eval()
    pool = None
    if args.shots:
        pool = (_records(argparse.Namespace(**{**vars(args), "split": "train"})) if args.shot_pool == "train"
                else _records(argparse.Namespace(data=args.shot_pool, format=None, split=None)))
    # a pool or calibration set sharing records with the evaluated data: refused by `evaluate` (DataOverlapError)
    shot_args = {"shots": args.shots, "shot_pool": pool, "feature_cache": args.feature_cache}
    calibration = _eval_calibration(args, model, records, shot_args)
    options = opt.metric_model_overrides(args)
    if several:
        protocol, evaluate = args.protocols, multi.evaluate_protocols  # type: ignore[assignment]
        shot_args.update(upstream_metrics=args.upstream_metrics, protocol_options=options)
    else:
        protocol = get_protocol(args.protocol, upstream_metrics=args.upstream_metrics, **options)
    metrics = evaluate(model, records, protocol, args.out, batch_size=args.batch_size,
                       closed_mode=args.closed_mode, data_spec=_data_spec(args.data, args.format, args.split),
                       adapter_path=args.adapter, calibration=calibration, **shot_args)
    print(metrics.pop("markdown") if several else json.dumps(metrics, indent=2, sort_keys=True))
    print(f"report: {Path(args.out) / ('comparison.md' if several else 'report.md')}")
    return 0


def _eval_calibration(args: argparse.Namespace, model: Any, records: Sequence[Any], shot_args: dict) -> Any:
    """The calibration `eval` applies: fitted on held-out data (and saved into the adapter on request), or the
    adapter's own with `--abstain-below` as its threshold, or None (the adapter's as is)."""
    if args.calibrate_on or args.calibrate_split:
        from .eval.runner import fit_calibration_on

        val = _records(argparse.Namespace(**{**vars(args), "data": args.calibrate_on or args.data,
                                             "split": args.calibrate_split}))
        calibration = fit_calibration_on(model, val, args.protocol, batch_size=args.batch_size,
                                         closed_mode=args.closed_mode, threshold=args.abstain_below,
                                         evaluated=records, **shot_args)
        print(f"calibration on {len(val)} validation items: ECE {calibration.fitted_on['ece_before']:.4f} -> "
              f"{calibration.fitted_on['ece_after']:.4f} (T generate {calibration.temperature_generate:.3f}, "
              f"T score {calibration.temperature_score:.3f})")
        if args.save_calibration:
            _save_calibration(args.adapter, calibration, model.image_summary)
        return calibration
    if args.abstain_below is not None:
        from .calibration import Calibration

        return (model.calibration or Calibration()).with_threshold(args.abstain_below)
    return None


def _save_calibration(adapter: str, calibration: Any, image_summary: Any = None) -> None:
    """Write the calibration into the adapter folder: only into a folder of the user's own, never a hub copy."""
    from .adapter_io import save_calibration
    from .hub import default_hub

    if not Path(adapter).is_dir() or Path(adapter).resolve().is_relative_to(Path(default_hub()).resolve()):
        raise ConfigError(f"--save-calibration writes into the adapter folder: {adapter} is a hub or downloaded "
                          f"adapter; pull it to a folder of your own (hub pull --to DIR) first")
    print(f"saved: {save_calibration(adapter, calibration, image_summary)}")


# --------------------------------------------------------------------------------------------------------- predict
def _add_predict(sub: Any) -> None:
    s = sub.add_parser("predict", help="answer every record of a dataset without answers; JSONL with confidences")
    s.add_argument("--adapter", required=True, help="adapter folder or hub name[@version]")
    opt.data_args(s)
    s.add_argument("--out", default="predictions.jsonl", help="JSONL file (default %(default)s)")
    opt.protocol_arg(s, "how questions are answered")
    opt.closed_mode_arg(s)
    opt.batch_size_arg(s, 8)
    opt.max_new_tokens_arg(s)
    opt.abstain_arg(s)
    s.set_defaults(func=cmd_predict)


def cmd_predict(args: argparse.Namespace) -> int:
    """`prefixvqa predict`: answers with confidences for unlabeled data, written as JSON lines. `--out` is never an
    input file, and an existing one is replaced only when it is a predictions file (`predict.check_output`)."""
    from .data.records import DataError
    from .model import MedVQAAdapter
    from .predict import check_output, input_paths, load_unlabeled, predict_records, write_predictions

    spec = _data_spec(args.data, args.format, None)
    records = load_unlabeled(spec, args.split)  # a bad --data or --out fails before a model is loaded
    if not records:
        raise DataError(f"no records in {args.data}")
    check_output(args.out, inputs := input_paths(spec, records))
    model = MedVQAAdapter.from_pretrained(args.adapter).eval()
    rows = predict_records(model, records, protocol=args.protocol, closed_mode=args.closed_mode,
                           batch_size=args.batch_size,
                           max_new_tokens=args.max_new_tokens, abstain_below=_threshold(args, model))
    write_predictions(rows, args.out, inputs=inputs)
    uncertain = sum(r["abstained"] for r in rows)
    print(f"{len(rows)} answers ({uncertain} uncertain, {sum(bool(r.get('ood')) for r in rows)} about images unlike "
          f"the training images) written to {args.out}")
    return 0


# ----------------------------------------------------------------------------------------------------------- serve
def _add_serve(sub: Any) -> None:
    s = sub.add_parser("serve", help="local web app: upload an image, ask, see answer, confidence and heatmap")
    s.add_argument("--adapter", required=True, help="adapter folder or hub name[@version]")
    s.add_argument("--hub", default=None, help="also offer the hub's adapters on the same base (default checkpoints/)")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default %(default)s: this machine only)")
    s.add_argument("--port", type=int, default=7860, help="(default %(default)s)")
    s.add_argument("--max-upload-mb", type=float, default=20.0, help="largest accepted upload (default %(default)s)")
    s.add_argument("--keep-uploads", metavar="DIR", help="keep uploaded images here (default: nothing is kept)")
    opt.method_arg(s)
    opt.abstain_arg(s)
    s.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    """`prefixvqa serve`: the local web app, until interrupted."""
    from .app import serve

    serve(args.adapter, hub=args.hub, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb,
          abstain_below=args.abstain_below, keep_uploads=args.keep_uploads, explain_method=args.method)
    return 0


# ----------------------------------------------------------------------------------------------------------- sweep
def _add_sweep(sub: Any) -> None:
    s = sub.add_parser("sweep", help="few-shot learning curve: train and evaluate at several training-set sizes")
    s.add_argument("recipe")
    s.add_argument("--train-sizes", default="16,64,256,all", type=opt.train_sizes,
                   help="comma-separated training-set sizes; 'all' is the whole set (default %(default)s)")
    s.add_argument("--seeds", type=opt.positive_int, default=3, help="runs per size (default %(default)s)")
    opt.protocol_arg(s, "evaluation protocol")
    s.add_argument("--out", default="runs/sweep", help="results folder (default %(default)s)")
    opt.set_arg(s)
    s.add_argument("--smoke", action="store_true", help="apply the recipe's tiny offline smoke override")
    s.set_defaults(func=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    """`prefixvqa sweep`: a learning curve (metric against training-set size, over seeds) with its plot."""
    from .sweep import sweep

    result = sweep(args.recipe, train_sizes=args.train_sizes, seeds=args.seeds, out_dir=args.out,
                   protocol=args.protocol, sets=args.set, smoke=args.smoke)
    print(json.dumps(result["summary"], indent=2, default=str))
    print(f"learning curve: {Path(args.out) / 'learning_curve.png'}")
    return 0


# ------------------------------------------------------------------------------------------------------------ demo
def _add_demo(sub: Any) -> None:
    s = sub.add_parser("demo", help="offline demo: train and evaluate on real DICOM + generated lesions (SmolLM2)")
    s.add_argument("--out", default="checkpoints/demo", help="adapter and results folder (default %(default)s)")
    s.add_argument("--n-train", type=opt.positive_int,
                   help="generated lesion training questions (default: run_demo's)")
    s.add_argument("--n-test", type=opt.positive_int, help="generated lesion held-out questions")
    s.add_argument("--epochs", type=opt.positive_int, help="training epochs (default: run_demo's)")
    s.add_argument("--seed", type=int, help="seed of data and training (default: run_demo's)")
    s.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    """`prefixvqa demo`: the offline end-to-end demo; only the options given override `run_demo`'s defaults."""
    from .demo import run_demo

    given = {k: getattr(args, k) for k in ("n_train", "n_test", "epochs", "seed") if getattr(args, k) is not None}
    run_demo(args.out, **given)
    return 0


# ---------------------------------------------------------------------------------------------------------- export
def _add_export(sub: Any) -> None:
    s = sub.add_parser("export", help="write a merged full-precision decoder + mapper + processor (no peft needed)")
    s.add_argument("adapter")
    s.add_argument("--merge", action="store_true",
                   help="fold the trained adapter into the decoder (dequantising a 4/8-bit base)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--dtype", type=opt.DTYPES, choices=opt.DTYPES, metavar="DTYPE",
                   help="merged weights' dtype: %(choices)s (default: the adapter's decoder.dtype)")
    s.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    """`prefixvqa export --merge`: an adapter folder whose decoder has the adapter folded in, loadable without peft."""
    from .export import EARLIER_EXPORT, earlier_export, export_merged
    from .fileio import refuse_foreign
    from .model import MedVQAAdapter

    if not args.merge:
        raise ConfigError("prefixvqa export needs --merge: the adapter folder itself is already the shareable unit; "
                          "--merge writes a merged full-precision decoder + mapper + processor loadable without peft")
    refuse_foreign(Path(args.out), earlier_export, EARLIER_EXPORT)  # before the adapter is loaded
    folder, caveat = export_merged(MedVQAAdapter.from_pretrained(args.adapter), args.out, args.dtype)
    print(f"merged export: {folder} (decoder in {folder / 'decoder'}; load with MedVQAAdapter.from_pretrained)")
    if caveat:
        print(f"precision: {caveat}", file=sys.stderr)
    return 0


# ------------------------------------------------------------------------------------------------------- fit-check
def _add_fit_check(sub: Any) -> None:
    s = sub.add_parser("fit-check", help="predict a recipe's training-step GPU memory before loading anything "
                                         "(exit status 1 when a stage does not fit)")
    s.add_argument("recipe")
    s.add_argument("--gpu-mem", help="GPU memory to fit in, e.g. 11GB (GB = GiB = 2^30 bytes)")
    opt.set_arg(s)
    s.add_argument("--stage", help="one curriculum stage (default: every stage)")
    opt.batch_size_arg(s, None, "per-process batch (default: the recipe's)")
    s.add_argument("--text-len", type=opt.positive_int, help="text tokens per sample (default: template.max_length)")
    s.add_argument("--answer-len", type=opt.positive_int, default=32,
                   help="supervised tokens per sample (default %(default)s)")
    s.add_argument("--num-processes", type=opt.positive_int,
                   help="processes sharing the model when train.distributed shards it")
    s.add_argument("--decoder-config", help="a transformers config.json when the decoder's is not available")
    s.add_argument("--encoder-config", help="an open_clip model config JSON when the encoder's is not available")
    s.add_argument("--reserve", default="0.75GB", help="CUDA context + allocator slack added before comparing")
    s.add_argument("--json", action="store_true", help="print the reports as JSON")
    s.set_defaults(func=cmd_fit_check)


def cmd_fit_check(args: argparse.Namespace) -> int:
    """`prefixvqa fit-check`: predicted training memory per stage; exit status 1 when a stage does not fit."""
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


# --------------------------------------------------------------------------------------------------------- presets
def _add_presets(sub: Any) -> None:
    s = sub.add_parser("presets", help="list the named adapter presets")
    s.set_defaults(func=cmd_presets)


def cmd_presets(args: argparse.Namespace) -> int:
    """`prefixvqa presets`: every preset name with the start of its description."""
    from .presets import list_presets, preset_info

    for name in list_presets():
        print(f"{name:<28} {preset_info(name).get('description', '')[:90]}")
    return 0


# ------------------------------------------------------------------------------------------------------ the parser
_SUBCOMMANDS = (_add_train, _add_cache, _add_answer, _add_eval, _add_predict, add_hub, _add_serve, _add_sweep,
                _add_demo, _add_export, _add_fit_check, _add_presets)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line (each subcommand's options, `--version`, `--debug`); cheap to build, so `--help` and
    usage errors answer at once. Tests and wrappers parse with it without running anything."""
    p = opt.Parser(prog="prefixvqa", description="Vision-language prefix adapters for medical VQA.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.set_defaults(debug=False)
    sub = p.add_subparsers(dest="command", required=True)
    for add in _SUBCOMMANDS:
        add(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns the exit status (the `prefixvqa` script and `python -m prefixvqa` exit with it).

    A `PrefixVQAError` and the machine's own errors (see `_machine_error`) print one line and return 2 (1 for a
    diverged training run); any other exception propagates with its traceback, as does every error under `--debug`.
    """
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    if args.debug:
        return args.func(args)
    try:
        return args.func(args)
    except PrefixVQAError as exc:
        _say(args.command, exc)
        return _exit_status(exc)
    except (OSError, ImportError) as exc:
        if not _machine_error(exc):
            raise
        _say(args.command, exc)
        return 2
    except KeyboardInterrupt as exc:  # a training run's SignalInterrupt carries its signal: exit as killed by it
        from .train.stopping import SignalInterrupt

        if isinstance(exc, SignalInterrupt):
            _say(args.command, exc)
            return 128 + exc.signum
        print("interrupted", file=sys.stderr)
        return 130


def _say(command: str, exc: BaseException) -> None:
    """The one error line; written in one call so ranks sharing a stderr pipe never run their lines together."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or exc.__class__.__name__
    sys.stderr.write(f"prefixvqa {command}: error: {text}\n")
    sys.stderr.flush()


def _exit_status(exc: PrefixVQAError) -> int:
    """128 + the signal when SIGTERM/Ctrl-C stopped a training run (train, demo, sweep alike: as a process killed by
    it would), 1 when a training run diverged (not a usage error: the run itself failed), else 2."""
    from .train.stopping import TrainingInterrupted
    from .train.trainer import TrainingDiverged  # already loaded whenever a training run raised it

    if isinstance(exc, TrainingInterrupted):
        return 128 + exc.signum
    return 1 if isinstance(exc, TrainingDiverged) else 2


def _machine_error(exc: BaseException) -> bool:
    """The machine's state rather than a bug, so one line too: an OSError (a missing or unreadable file, a full disk;
    its message names the path) and an optional package that is not installed. A prefixvqa module that fails to
    import is a bug and keeps its traceback."""
    if isinstance(exc, OSError):
        return True
    return isinstance(exc, ImportError) and (exc.name or "").partition(".")[0] != "prefixvqa"


if __name__ == "__main__":
    sys.exit(main())
