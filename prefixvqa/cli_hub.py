"""`prefixvqa hub ...`: push, pull, list and verify shared adapters (a local or shared-folder hub, or the Hugging
Face Hub with `--hf`). Kept apart from `cli.py` so each file stays one screenful per concern; `cli.build_parser`
adds it like every other subcommand.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


# ------------------------------------------------------------------------------------------------------------- hub
def add_hub(sub: Any) -> None:
    """Declare `prefixvqa hub` and its subcommands on the main parser's subparsers."""
    s = sub.add_parser("hub", help="the adapter hub: push, pull, list, verify (local folder, fsspec URL, HF Hub)")
    hub_sub = s.add_subparsers(dest="hub_command", required=True)
    h = hub_sub.add_parser("push", help="copy an adapter folder into the hub")
    h.add_argument("folder")
    h.add_argument("--name", help="name in the hub (default: the folder's)")
    h.add_argument("--version", help="version in the hub (default: the next one)")
    h.add_argument("--task", help="what the adapter does (default: from its metrics, else VQA)")
    h.add_argument("--hf", metavar="REPO_ID", help="push to this Hugging Face Hub model repo instead")
    h.add_argument("--public", action="store_true", help="with --hf: create the repo public (default private)")
    h.set_defaults(func=cmd_hub_push)
    h = hub_sub.add_parser("pull", help="copy NAME[@VERSION] out of the hub, checking every file")
    h.add_argument("ref", metavar="NAME[@VERSION]")
    h.add_argument("--to", help="destination folder (default: the prefixvqa cache)")
    h.add_argument("--hf", action="store_true", help="NAME is a Hugging Face Hub repo id[@revision]")
    h.add_argument("--force", action="store_true", help="replace --to even when it holds files prefixvqa did not "
                   "write (they are deleted); without it only a new, empty or earlier adapter folder is replaced")
    h.set_defaults(func=cmd_hub_pull)
    h = hub_sub.add_parser("list", help="adapters with base models, task, metrics")
    h.add_argument("--json", action="store_true", help="print the rows as JSON")
    h.set_defaults(func=cmd_hub_list)
    h = hub_sub.add_parser("verify", help="check every file of the hub (or of NAME[@VERSION]) against the index")
    h.add_argument("ref", nargs="?", metavar="NAME[@VERSION]")
    h.set_defaults(func=cmd_hub_verify)
    for h in hub_sub.choices.values():
        h.add_argument("--hub", help="hub root, a folder or fsspec URL (default $PREFIXVQA_HUB or checkpoints/)")


def _hub_root(args: argparse.Namespace) -> str:
    from .hub import default_hub

    return args.hub or default_hub()


def cmd_hub_push(args: argparse.Namespace) -> int:
    """`prefixvqa hub push`: publish an adapter folder in the local/fsspec hub, or to a Hugging Face Hub repo."""
    from .hub import Hub, push_to_hf

    if args.hf:
        result = push_to_hf(args.folder, args.hf, private=not args.public)
        print(f"pushed {args.folder} to the Hugging Face Hub repo {args.hf}: {result}")
        return 0
    root = _hub_root(args)
    print(f"pushed {Hub(root).push(args.folder, args.name, args.version, task=args.task)} to {root}")
    return 0


def cmd_hub_pull(args: argparse.Namespace) -> int:
    """`prefixvqa hub pull`: a verified local copy of a hub adapter; prints its folder. An existing --to is replaced
    only when it is an earlier adapter prefixvqa wrote (its manifest proves it) or with --force."""
    from .hub import Hub, pull_from_hf

    if not args.hf:
        print(Hub(_hub_root(args)).pull(args.ref, args.to, overwrite=args.force))
        return 0
    repo, _, revision = args.ref.partition("@")
    print(pull_from_hf(repo, revision or None, to=args.to, overwrite=args.force))
    return 0


def cmd_hub_list(args: argparse.Namespace) -> int:
    """`prefixvqa hub list`: the hub's adapters with their base models, task and headline metrics."""
    from .hub import Hub

    root = _hub_root(args)
    rows = Hub(root).list()
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True))
        return 0
    if not rows:
        print(f"no adapters in {root}")
    for r in rows:
        metrics = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in list(r["metrics"].items())[:4])
        here = "yes" if r["available"] else f"no ({r['missing'][:80]})"
        print(f"{r['ref']:<28} encoder {r['encoder']}; decoder {r['decoder']}; task: {r['task']}; "
              f"{metrics or 'no metrics'}; base models here: {here}")
    return 0


def cmd_hub_verify(args: argparse.Namespace) -> int:
    """`prefixvqa hub verify`: check stored files against the index; exit status 1 when any problem is found."""
    from .hub import Hub

    root = _hub_root(args)
    problems = Hub(root).verify(args.ref)
    for p in problems:
        print(p)
    print(f"{root}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0
