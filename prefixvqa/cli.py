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


def _count(text: str) -> int:
    """A whole number >= 0 (0 shots: zero-shot)."""
    return 0 if text.strip() == "0" else _positive_int(text)


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
    threshold = _threshold(args, model)
    if args.choices:
        options = [c.strip() for c in args.choices.split(",")]
        probs = model.score_choices([args.image], [args.question], [options])[0]
        for option, p in sorted(zip(options, probs), key=lambda x: -x[1]):
            print(f"{p:.3f}  {option}")
        if threshold is not None and max(probs) < threshold:
            print(f"uncertain (best choice below the confidence threshold {threshold:.2f})")
        return 0
    answer = model.answer([args.image], [args.question], max_new_tokens=args.max_new_tokens,
                          num_beams=args.num_beams, abstain_below=threshold)[0]
    print(answer.text)
    guess = f"best guess {answer.guess!r}, " if answer.abstained else ""
    print(f"({guess}confidence {answer.confidence:.3f}{'' if model.calibration else ' uncalibrated'}; "
          f"log-probability {answer.score:.3f} over {answer.num_tokens} tokens)", file=sys.stderr)
    if args.explain is not None:
        from .explain import explain

        out = Path(args.explain or Path(str(args.image)).stem + "_explain.png")
        explain(model, args.image, args.question, out, method=args.method, answer=answer)  # the printed answer
        print(f"grounding heatmap ({args.method}): {out}", file=sys.stderr)
    return 0


def _threshold(args: argparse.Namespace, model: Any) -> float | None:
    """--abstain-below, else the adapter calibration's threshold, else none."""
    if getattr(args, "abstain_below", None) is not None:
        if not 0.0 <= args.abstain_below <= 1.0:
            raise ValueError(f"--abstain-below must be a confidence in [0, 1], got {args.abstain_below}")
        return args.abstain_below
    return model.calibration.threshold if model.calibration is not None else None


def _refuse_overlap(what: str, extra: Sequence[Any], evaluated: Sequence[Any], why: str) -> None:
    """Shots and calibration must come from other records than the ones evaluated (a single-file dataset has no
    separate split: its "train" is the test data itself)."""
    shared = {r.id for r in extra} & {r.id for r in evaluated}
    if shared:
        raise ValueError(f"{what} shares {len(shared)} record(s) with the evaluated data (e.g. {sorted(shared)[0]!r});"
                         f" {why}")


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
    pool = None
    if args.shots:
        pool = (_records(argparse.Namespace(**{**vars(args), "split": "train"})) if args.shot_pool == "train"
                else _records(argparse.Namespace(data=args.shot_pool, format=None, split=None)))
    if pool is not None:
        _refuse_overlap("the shot pool", pool, records,
                        "its answers would leak into the prompts: pass --shot-pool DATA")
    shot_args = {"shots": args.shots, "shot_pool": pool, "feature_cache": args.feature_cache}
    calibration = None
    if args.calibrate_on or args.calibrate_split:
        from .eval.runner import fit_calibration_on

        val = _records(argparse.Namespace(**{**vars(args), "data": args.calibrate_on or args.data,
                                             "split": args.calibrate_split}))
        _refuse_overlap("the calibration set", val, records,
                        "a temperature fitted on the test items flatters the reported calibration: pass "
                        "--calibrate-on DATA or --calibrate-split with a split of its own")
        calibration = fit_calibration_on(model, val, args.protocol, batch_size=args.batch_size,
                                         closed_mode=args.closed_mode, threshold=args.abstain_below, **shot_args)
        print(f"calibration on {len(val)} validation items: ECE {calibration.fitted_on['ece_before']:.4f} -> "
              f"{calibration.fitted_on['ece_after']:.4f} (T generate {calibration.temperature_generate:.3f}, "
              f"T score {calibration.temperature_score:.3f})")
        if args.save_calibration:
            from .adapter_io import save_calibration

            from .hub import default_hub

            if not Path(args.adapter).is_dir() or Path(args.adapter).resolve().is_relative_to(
                    Path(default_hub()).resolve()):
                raise ValueError(f"--save-calibration writes into the adapter folder: {args.adapter} is a hub or "
                                 f"downloaded adapter; pull it to a folder of your own (hub pull --to DIR) first")
            print(f"saved: {save_calibration(args.adapter, calibration)}")
    elif args.abstain_below is not None:
        from .calibration import Calibration

        base = model.calibration or Calibration()
        calibration = Calibration(base.temperature_generate, base.temperature_score, args.abstain_below,
                                  base.fitted_on)
    from .eval.protocols import get_protocol

    protocol = get_protocol(args.protocol, upstream_metrics=True) if args.upstream_metrics else args.protocol
    metrics = evaluate(model, records, protocol, args.out, batch_size=args.batch_size,
                       closed_mode=args.closed_mode, data_spec=_data_spec(args.data, args.format, args.split),
                       adapter_path=args.adapter, calibration=calibration, **shot_args)
    print(json.dumps(metrics, indent=2, sort_keys=True))
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .model import MedVQAAdapter
    from .predict import load_unlabeled, predict_records, write_predictions

    model = MedVQAAdapter.from_pretrained(args.adapter).eval()
    records = load_unlabeled(_data_spec(args.data, args.format, None), args.split)
    if not records:
        raise ValueError(f"no records in {args.data}")
    rows = predict_records(model, records, protocol=args.protocol, closed_mode=args.closed_mode,
                           batch_size=args.batch_size,
                           max_new_tokens=args.max_new_tokens, abstain_below=_threshold(args, model))
    write_predictions(rows, args.out)
    uncertain = sum(r["abstained"] for r in rows)
    print(f"{len(rows)} answers ({uncertain} uncertain) written to {args.out}")
    return 0


def cmd_hub(args: argparse.Namespace) -> int:
    from .hub import Hub, default_hub, pull_from_hf, push_to_hf

    args.hub = args.hub or default_hub()
    if args.hub_command == "push":
        if args.hf:
            result = push_to_hf(args.folder, args.hf, private=not args.public)
            print(f"pushed {args.folder} to the Hugging Face Hub repo {args.hf}: {result}")
            return 0
        print(f"pushed {Hub(args.hub).push(args.folder, args.name, args.version, task=args.task)} to {args.hub}")
        return 0
    if args.hub_command == "pull":
        if args.hf:
            repo, _, revision = args.ref.partition("@")
            path = pull_from_hf(repo, revision or None)
            if args.to:
                import shutil

                from .fileio import atomic_dir

                if Path(args.to).exists():
                    raise ValueError(f"--to {args.to} exists; give a new folder")
                with atomic_dir(args.to) as tmp:  # all or nothing, like every adapter folder
                    shutil.copytree(path, tmp, dirs_exist_ok=True)
                path = Path(args.to)
        else:
            path = Hub(args.hub).pull(args.ref, args.to)
        print(path)
        return 0
    hub = Hub(args.hub)
    if args.hub_command == "list":
        rows = hub.list()
        if args.json:
            print(json.dumps(rows, indent=2, sort_keys=True))
            return 0
        if not rows:
            print(f"no adapters in {args.hub}")
        for r in rows:
            metrics = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in list(r["metrics"].items())[:4])
            here = "yes" if r["available"] else f"no ({r['missing'][:80]})"
            print(f"{r['ref']:<28} encoder {r['encoder']}; decoder {r['decoder']}; task: {r['task']}; "
                  f"{metrics or 'no metrics'}; base models here: {here}")
        return 0
    problems = hub.verify(args.ref)
    for p in problems:
        print(p)
    print(f"{args.hub}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .app import serve

    serve(args.adapter, hub=args.hub, host=args.host, port=args.port, max_upload_mb=args.max_upload_mb,
          abstain_below=args.abstain_below, keep_uploads=args.keep_uploads, explain_method=args.method)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import sweep

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

    def abstain_arg(s: argparse.ArgumentParser) -> None:
        s.add_argument("--abstain-below", type=float, metavar="P",
                       help="answer 'uncertain' below this confidence (default: the adapter calibration's threshold)")

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
    abstain_arg(s)
    s.add_argument("--explain", nargs="?", const="", metavar="PNG",
                   help="write a grounding heatmap overlay (default: <image>_explain.png)")
    s.add_argument("--method", choices=["occlusion", "grad_x_input"], default="occlusion",
                   help="grounding attribution (default occlusion)")
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
    s.add_argument("--shots", type=_count, default=0, help="k shots per query in the template's few-shot format")
    s.add_argument("--shot-pool", default="train", metavar="train|DATA",
                   help="where shots are retrieved from: the same dataset's train split, or a dataset path/spec")
    s.add_argument("--feature-cache", help="feature cache folder for retrieval (default ~/.cache/prefixvqa/features)")
    s.add_argument("--calibrate-on", metavar="DATA", help="fit temperature scaling on this dataset first")
    s.add_argument("--calibrate-split", help="fit temperature scaling on this split (of --calibrate-on or --data)")
    s.add_argument("--save-calibration", action="store_true", help="store the fitted calibration in the adapter")
    abstain_arg(s)
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("predict", help="answer every record of a dataset without answers; JSONL with confidences")
    s.add_argument("--adapter", required=True, help="adapter folder or hub name[@version]")
    data_args(s)
    s.add_argument("--out", default="predictions.jsonl")
    s.add_argument("--protocol", default="llava_med", help="how questions are answered (see eval)")
    s.add_argument("--closed-mode", choices=["score", "generate"], help="rank a closed question's candidates "
                                                                        "(score) or generate (the protocol's default)")
    s.add_argument("--batch-size", type=_positive_int, default=8)
    s.add_argument("--max-new-tokens", type=_positive_int, default=None,
                   help="default: the adapter's generation settings")
    abstain_arg(s)
    s.set_defaults(func=cmd_predict)

    s = sub.add_parser("hub", help="the adapter hub: push, pull, list, verify (local folder, fsspec URL, HF Hub)")
    hub_sub = s.add_subparsers(dest="hub_command", required=True)
    h = hub_sub.add_parser("push", help="copy an adapter folder into the hub")
    h.add_argument("folder")
    h.add_argument("--name")
    h.add_argument("--version")
    h.add_argument("--task", help="what the adapter does (default: from its metrics, else VQA)")
    h.add_argument("--hf", metavar="REPO_ID", help="push to this Hugging Face Hub model repo instead")
    h.add_argument("--public", action="store_true", help="with --hf: create the repo public (default private)")
    h = hub_sub.add_parser("pull", help="copy NAME[@VERSION] out of the hub, checking every file")
    h.add_argument("ref", metavar="NAME[@VERSION]")
    h.add_argument("--to", help="destination folder (default: the prefixvqa cache)")
    h.add_argument("--hf", action="store_true", help="NAME is a Hugging Face Hub repo id[@revision]")
    h = hub_sub.add_parser("list", help="adapters with base models, task, metrics")
    h.add_argument("--json", action="store_true")
    h = hub_sub.add_parser("verify", help="check every file of the hub (or of NAME[@VERSION]) against the index")
    h.add_argument("ref", nargs="?", metavar="NAME[@VERSION]")
    for h in hub_sub.choices.values():
        h.add_argument("--hub", default=None, help="hub root: folder or fsspec URL (default checkpoints/ or "
                                                   "$PREFIXVQA_HUB)")
    s.set_defaults(func=cmd_hub)

    s = sub.add_parser("serve", help="local web app: upload an image, ask, see answer, confidence and heatmap")
    s.add_argument("--adapter", required=True, help="adapter folder or hub name[@version]")
    s.add_argument("--hub", default=None, help="also offer the hub's adapters on the same base (default checkpoints/)")
    s.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=7860)
    s.add_argument("--max-upload-mb", type=float, default=20.0)
    s.add_argument("--keep-uploads", metavar="DIR", help="keep uploaded images here (default: nothing is kept)")
    s.add_argument("--method", choices=["occlusion", "grad_x_input"], default="occlusion")
    abstain_arg(s)
    s.set_defaults(func=cmd_serve)

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
    s.add_argument("--batch-size", type=_positive_int, help="per-process batch (default: the recipe's)")
    s.add_argument("--text-len", type=_positive_int, help="text tokens per sample (default: template.max_length)")
    s.add_argument("--answer-len", type=_positive_int, default=32, help="supervised tokens per sample (default 32)")
    s.add_argument("--num-processes", type=_positive_int, help="processes sharing the model under fsdp/deepspeed")
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
    from .hub import HubError
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
    except (ConfigError, DataError, ModelNotAvailableError, AdapterLoadError, HubError, RunLockedError, ImportError,
            ValueError, OSError) as exc:  # OSError: missing files, a recipe folder, a full disk (the path is named)
        say(exc)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
