"""The ``fedguard`` command line: ``run`` an experiment, ``validate`` a config file."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler

EXIT_CONFIG = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedguard", description="Federated learning with privacy and robustness."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an experiment from a TOML file")
    run.add_argument("config", type=Path, help="experiment TOML file")
    run.add_argument("--out", type=Path, default=None, help="run folder (default runs/NAME)")
    run.add_argument("--resume", action="store_true", help="continue after the last finished round")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set client.lr=0.05 (repeatable)",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    val = sub.add_parser("validate", help="check an experiment file without running it")
    val.add_argument("config", type=Path)
    val.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console()
    err = Console(stderr=True)
    logging.basicConfig(
        level=logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err, show_path=False)],
    )
    from fedguard.experiment.config import ConfigError

    try:
        if args.command == "validate":
            return _validate(args, console)
        from fedguard.experiment import runner
        from fedguard.protocol.driver import RoundFailedError

        try:
            runner.run(
                args.config,
                out=args.out,
                resume=args.resume,
                overrides=args.overrides,
                progress=not args.quiet,
                console=console,
            )
        except runner.RunInterrupted as exc:
            err.print(f"[yellow]{exc}[/yellow]")
            return EXIT_INTERRUPTED
        except RoundFailedError as exc:
            err.print(f"[red]error:[/red] {exc}")
            return EXIT_FAILED
    except ConfigError as exc:
        for line in str(exc).splitlines():
            err.print(f"[red]error:[/red] {line}", highlight=False, soft_wrap=True)
        return EXIT_CONFIG
    return 0


def _validate(args: argparse.Namespace, console: Console) -> int:
    from fedguard.experiment import config as config_mod
    from fedguard.experiment.runner import Experiment

    cfg = config_mod.load(args.config, args.overrides)
    exp = Experiment(cfg)
    console.print(
        f"{args.config}: valid — {len(exp.fed.clients)} clients, {cfg.clients_per_round} per round, "
        f"{cfg.experiment.rounds} rounds, model {cfg.model.name} ({cfg.model.framework}, "
        f"{exp.model.spec.size:,} parameters), strategy {cfg.server.strategy}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
