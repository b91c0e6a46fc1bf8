"""`sdrt info`: what a model folder holds and which backends can run it here."""

from __future__ import annotations


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="what a model folder holds and which backends can run it here")
    p.add_argument("model", nargs="?", default=None, help="model folder (default: the built-in model)")
    p.add_argument("--verify", action="store_true", help="check every file's sha256 against the export's manifest")
    p.set_defaults(func=cmd_info)


def cmd_info(args) -> int:
    from sdrt.info import describe_model

    text, ok = describe_model(args.model, verify=args.verify)
    print(text)
    return 0 if ok else 1
