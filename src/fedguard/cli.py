"""The ``fedguard`` command line.

``run`` an experiment in simulation, ``validate`` a config file; deploy it over gRPC with
``server`` and ``client`` (or ``launch`` both on loopback); make development ``certs`` and
client (or viewer) ``tokens``; watch runs live with ``dashboard``; write a run's ``report``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.logging import RichHandler

EXIT_CONFIG = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130
EXIT_REFUSED = 3
# fedguard.experiment.deployment.DEFAULT_ROUND_DEADLINE_S, without importing gRPC for --help.
_DEFAULT_ROUND_DEADLINE_S = 120.0


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
    run.add_argument(
        "--runtime",
        choices=["inprocess", "ray"],
        default=None,
        help="where the clients run: in this process, or on Ray actors (runtime.kind)",
    )
    run.add_argument(
        "--address",
        default=None,
        metavar="HOST:PORT",
        help="join this running Ray cluster (or 'auto'); implies --runtime ray (runtime.address)",
    )
    run.add_argument(
        "--audit-canaries",
        type=int,
        default=None,
        metavar="M",
        help="insert M canaries for `fedguard audit --attack canary` (audit.canaries)",
    )
    _audit_parser(sub)
    val = sub.add_parser("validate", help="check an experiment file without running it")
    val.add_argument("config", type=Path)
    val.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    _deploy_parsers(sub)
    _observe_parsers(sub)
    return parser


def _dashboard_options(p: argparse.ArgumentParser, address_flag: str, default: str | None) -> None:
    p.add_argument(
        address_flag,
        dest="dashboard",
        default=default,
        metavar="HOST:PORT",
        help="serve the live dashboard here (loopback by default; any other address needs "
        "--viewer-tokens)",
    )
    p.add_argument(
        "--viewer-tokens",
        type=Path,
        default=None,
        metavar="VIEWERS_JSON",
        help="viewers.json made by `fedguard tokens DIR --viewer NAME`: the dashboard then "
        "needs a viewer token",
    )


def _observe_parsers(sub) -> None:
    dash = sub.add_parser("dashboard", help="follow run folders live in a web page")
    dash.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR", help="run folders")
    _dashboard_options(dash, "--address", "127.0.0.1:8050")
    dash.add_argument("--tls-cert", type=Path, help="serve HTTPS with this certificate (PEM)")
    dash.add_argument("--tls-key", type=Path, help="the certificate's private key (PEM)")
    dash.add_argument(
        "--poll-ms", type=int, default=1000, help="how often the page refreshes (milliseconds)"
    )
    report = sub.add_parser("report", help="one self-contained HTML file of a run")
    report.add_argument("run_dir", type=Path, help="the run folder")
    report.add_argument(
        "-o", "--out", type=Path, default=None, help="HTML file (default RUN_DIR/report.html)"
    )


def _audit_parser(sub) -> None:
    audit = sub.add_parser(
        "audit",
        help="attack a finished run: canary epsilon bounds (final model, one update), "
        "membership, inversion",
    )
    audit.add_argument("run_dir", type=Path, help="the run folder `fedguard run` wrote")
    audit.add_argument(
        "--attack",
        action="append",
        choices=["inversion", "membership", "canary", "update", "all"],
        default=None,
        help="attack to run (repeatable; default all: canary only where the run has canaries, "
        "update only under local DP)",
    )
    audit.add_argument("--out", type=Path, default=None, help="folder (default RUN_DIR/audit)")
    audit.add_argument(
        "--reference-models",
        type=int,
        default=4,
        metavar="K",
        help="membership: LiRA reference models trained by the run's recipe (0: loss attack only)",
    )
    audit.add_argument(
        "--max-members", type=int, default=2000, help="membership: training records scored"
    )
    audit.add_argument(
        "--round", type=int, default=1, help="inversion and update: the round attacked"
    )
    audit.add_argument(
        "--client", type=int, default=None, help="inversion and update: the client attacked"
    )
    audit.add_argument(
        "--update-canaries",
        type=int,
        default=1000,
        metavar="M",
        help="update: gradient canaries put in the attacked client's replayed update",
    )
    audit.add_argument(
        "--seed", type=int, default=0, help="update: seed of the canaries and their coins"
    )
    audit.add_argument(
        "--batch-size", type=int, default=1, help="inversion: records in the attacked update"
    )
    audit.add_argument(
        "--local-steps", type=int, default=1, help="inversion: local steps of the attacked update"
    )
    audit.add_argument(
        "--iterations", type=int, default=1000, help="inversion: optimisation steps of the attack"
    )


def _overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def _deploy_parsers(sub) -> None:
    server = sub.add_parser(
        "server", help="serve an experiment to clients over gRPC (the server loads no data set)"
    )
    server.add_argument("config", type=Path, help="experiment TOML file")
    server.add_argument("--address", default="0.0.0.0:8443", help="HOST:PORT to listen on")
    server.add_argument("--tls-cert", type=Path, help="server certificate (PEM)")
    server.add_argument("--tls-key", type=Path, help="server private key (PEM)")
    server.add_argument("--client-ca", type=Path, help="CA of client certificates (mutual TLS)")
    server.add_argument("--tokens", type=Path, help="tokens file made by `fedguard tokens`")
    server.add_argument(
        "--identities",
        type=Path,
        help="the clients' public identity keys (identities.json made by `fedguard tokens`): "
        "secure aggregation then runs rounds secure against a malicious server",
    )
    server.add_argument(
        "--he-params",
        type=Path,
        help='secure_aggregation.mode = "ckks": the key-less HE parameters '
        "(he-server.params made by `fedguard he-keys`)",
    )
    server.add_argument("--out", type=Path, default=None, help="run folder (default runs/NAME)")
    server.add_argument("--resume", action="store_true", help="continue after the last round")
    server.add_argument("--insecure", action="store_true", help="plain text (loopback only)")
    server.add_argument(
        "--wait-clients",
        type=float,
        default=600.0,
        help="seconds to wait for all clients to connect before they register",
    )
    server.add_argument(
        "--round-deadline",
        type=float,
        default=None,
        metavar="SECONDS",
        help="seconds a round waits for each client's reply; overrides server.deadline_s "
        f"(default: server.deadline_s, else {_DEFAULT_ROUND_DEADLINE_S:g})",
    )
    server.add_argument(
        "--max-payload-mib",
        type=int,
        default=1024,
        metavar="MIB",
        help="largest client reply accepted, in MiB (default 1024)",
    )
    server.add_argument("--quiet", action="store_true", help="no progress bar or waiting reports")
    _dashboard_options(server, "--dashboard", None)
    _overrides(server)
    client = sub.add_parser("client", help="join a server as one client")
    client.add_argument(
        "config",
        type=Path,
        nargs="?",
        help="experiment file: its privacy settings (and, without --data, its demo data)",
    )
    client.add_argument("--server", required=True, help="HOST:PORT of the server")
    client.add_argument("--client-id", type=int, required=True)
    client.add_argument("--token-file", type=Path, help="this client's token")
    client.add_argument("--ca", type=Path, help="CA that signed the server's certificate")
    client.add_argument("--cert", type=Path, help="client certificate (mutual TLS)")
    client.add_argument("--key", type=Path, help="client private key (mutual TLS)")
    client.add_argument(
        "--identity",
        type=Path,
        help="this client's identity key (client-N.identity), with --identities",
    )
    client.add_argument(
        "--identities",
        type=Path,
        help="the federation's public identity keys (identities.json, handed out with the "
        "tokens, not by the server): secure aggregation only in rounds safe against a "
        "malicious server",
    )
    client.add_argument(
        "--he-key",
        type=Path,
        help='secure_aggregation.mode = "ckks": the federation\'s HE secret key '
        "(he-client.key made by `fedguard he-keys`; never give it to the server)",
    )
    client.add_argument("--data", type=Path, help=".npz with x, y (and x_eval, y_eval)")
    client.add_argument(
        "--eval-data", type=Path, help="held-out .npz with x, y to evaluate on, with --data"
    )
    client.add_argument(
        "--eval-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="hold out this share of --data to evaluate on (when it has no x_eval, y_eval)",
    )
    client.add_argument(
        "--state-dir",
        type=Path,
        help="folder for this client's state between rounds (kept across restarts)",
    )
    client.add_argument("--model", help="model name, with --data")
    client.add_argument("--framework", default="torch", choices=["torch", "keras"])
    client.add_argument("--num-classes", type=int, help="number of classes, with --data")
    client.add_argument("--insecure", action="store_true", help="plain text (loopback only)")
    client.add_argument(
        "--give-up-after", type=float, default=600.0, help="seconds of unreachable server"
    )
    _overrides(client)
    launch = sub.add_parser("launch", help="a server and N clients on this machine")
    launch.add_argument("config", type=Path)
    launch.add_argument("--clients", type=int, required=True)
    launch.add_argument("--out", type=Path, default=None)
    launch.add_argument("--resume", action="store_true")
    launch.add_argument("--insecure", action="store_true", help="plain text instead of dev TLS")
    launch.add_argument(
        "--round-deadline",
        type=float,
        default=None,
        metavar="SECONDS",
        help="the server's --round-deadline",
    )
    launch.add_argument(
        "--dashboard",
        default=None,
        metavar="HOST:PORT",
        help="the server serves the live dashboard here (a loopback address)",
    )
    _overrides(launch)
    certs = sub.add_parser("certs", help="make a development CA and certificates")
    certs.add_argument("directory", type=Path)
    certs.add_argument("--clients", type=int, default=0, help="client certificates 0..N-1")
    certs.add_argument("--host", action="append", default=[], help="extra server host name/IP")
    certs.add_argument("--tokens", action="store_true", help="also make client tokens")
    he_keys = sub.add_parser(
        "he-keys",
        help='make the federation\'s HE key (secure_aggregation.mode = "ckks"): a key file for '
        "the clients and a key-less parameter file for the server",
    )
    he_keys.add_argument("directory", type=Path)
    he_keys.add_argument(
        "--scheme",
        choices=["bfv", "ckks"],
        default="bfv",
        help="secure_aggregation.he_scheme of the experiment (default bfv)",
    )
    tokens = sub.add_parser("tokens", help="make (or revoke) client tokens")
    tokens.add_argument("directory", type=Path)
    tokens.add_argument("--clients", type=int, default=0, help="tokens for clients 0..N-1")
    tokens.add_argument("--revoke", type=int, action="append", default=[], metavar="ID")
    tokens.add_argument(
        "--viewer",
        action="append",
        default=[],
        metavar="NAME",
        help="make a read-only dashboard token viewer-NAME.token (hashes in viewers.json)",
    )
    tokens.add_argument("--revoke-viewer", action="append", default=[], metavar="NAME")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Plug-ins named in a TOML ("package.module:name") import from the working directory too,
    # as under ``python -m``; after the installed packages, which keep their names.
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.append(str(Path.cwd()))
    console = Console()
    err = Console(stderr=True)
    logging.basicConfig(
        level=logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err, show_path=False)],
    )
    if args.command in _OBSERVE:  # only reads run folders: no torch in a process serving pages
        try:
            return _OBSERVE[args.command](args, console, err)
        except _Refused as exc:
            err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
            return EXIT_CONFIG
    from fedguard.experiment.config import ConfigError

    try:
        if args.command == "validate":
            return _validate(args, console)
        if args.command == "audit":
            return _audit(args, console, err)
        if args.command in _DEPLOY:
            return _DEPLOY[args.command](args, console, err)
        from fedguard.experiment import runner

        return _exit_code_of_run(
            lambda: runner.run(
                args.config,
                out=args.out,
                resume=args.resume,
                overrides=[*args.overrides, *_runtime_overrides(args), *_audit_overrides(args)],
                progress=not args.quiet,
                console=console,
            ),
            err,
        )
    except ConfigError as exc:
        for line in str(exc).splitlines():
            err.print(f"[red]error:[/red] {line}", highlight=False, soft_wrap=True)
        return EXIT_CONFIG
    except OSError as exc:  # a named file or folder that cannot be read or written
        if exc.filename is None:
            raise
        err.print(
            f"[red]error:[/red] {exc.filename}: {exc.strerror or exc}",
            highlight=False,
            soft_wrap=True,
        )
        return EXIT_CONFIG


class _Refused(Exception):
    """A refusal of ``dashboard`` or ``report`` (which never import the experiment stack)."""


def _unreadable(flag: str, path: Path | None) -> str | None:
    """Why a file option's file cannot be read, or None when it can (or none was given)."""
    if path is None:
        return None
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except FileNotFoundError:
        return f"{flag} {path}: no such file"
    except IsADirectoryError:
        return f"{flag} {path}: is a directory, not a file"
    except OSError as exc:
        return f"{flag} {path}: cannot be read ({exc.strerror or exc})"
    return None


def _readable(flag: str, path: Path | None) -> None:
    """Refuse, before anything starts, a file option naming a missing or unreadable file."""
    problem = _unreadable(flag, path)
    if problem is not None:
        raise _config_error(problem)


def _runtime_overrides(args: argparse.Namespace) -> list[str]:
    """``--runtime`` and ``--address`` as the config overrides they stand for."""
    if args.address is not None:
        if args.runtime == "inprocess":
            raise _config_error("--address joins a Ray cluster; it needs --runtime ray.")
        return ['runtime.kind="ray"', f"runtime.address={json.dumps(args.address)}"]
    return [] if args.runtime is None else [f'runtime.kind="{args.runtime}"']


def _audit_overrides(args: argparse.Namespace) -> list[str]:
    """``--audit-canaries M`` as the config override it stands for."""
    return [] if args.audit_canaries is None else [f"audit.canaries={args.audit_canaries}"]


def _exit_code_of_run(start: Callable[[], object], err: Console) -> int:
    """Run a training run (simulated or served) and map how it ended to the exit code."""
    from fedguard.experiment import runner
    from fedguard.protocol.driver import RoundFailedError

    try:
        start()
    except runner.RunInterrupted as exc:
        err.print(f"[yellow]{exc}[/yellow]")
        return EXIT_INTERRUPTED
    except RoundFailedError as exc:
        err.print(f"[red]error:[/red] {exc}")
        return EXIT_FAILED
    return 0


def _audit(args: argparse.Namespace, console: Console, err: Console) -> int:
    """``fedguard audit``: one line per attack; exit 1 when a canary lower bound exceeds the
    accounted epsilon, 2 when the run cannot be audited."""
    from fedguard.audit import inversion, runner, update_canary
    from fedguard.audit.target import AuditError

    for flag, value, least in (
        ("--reference-models", args.reference_models, 0),
        ("--max-members", args.max_members, 1),
        ("--round", args.round, 1),
        ("--batch-size", args.batch_size, 1),
        ("--local-steps", args.local_steps, 1),
        ("--iterations", args.iterations, 1),
        ("--update-canaries", args.update_canaries, 2),
    ):
        if value < least:
            raise _config_error(f"{flag} must be at least {least}, got {value}.")
    options = runner.AuditOptions(
        reference_models=args.reference_models,
        max_members=args.max_members,
        inversion=inversion.InversionSettings(
            round=args.round,
            client=args.client,
            batch_size=args.batch_size,
            local_steps=args.local_steps,
            iterations=args.iterations,
        ),
        update=update_canary.UpdateCanarySettings(
            round=args.round, client=args.client, canaries=args.update_canaries, seed=args.seed
        ),
    )
    try:
        report = runner.audit(
            args.run_dir,
            args.attack or ["all"],
            out=args.out,
            options=options,
            progress=lambda name: err.print(f"[dim]{name} attack ...[/dim]"),
        )
    except AuditError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        return EXIT_CONFIG
    for line in report.lines:
        console.print(line, highlight=False, soft_wrap=True)
    console.print(f"Audit in [bold]{report.path}[/bold]")
    for row in report.violations:
        err.print(
            f"[red]error:[/red] run {row['run']}: the canary epsilon lower bound "
            f"{row['epsilon_lower_bound']:.3g} exceeds the accounted epsilon "
            f"{row['accounted_epsilon']:.3g}: the privacy accounting or its implementation is "
            "wrong",
            highlight=False,
            soft_wrap=True,
        )
    return EXIT_FAILED if report.violations else 0


def _validate(args: argparse.Namespace, console: Console) -> int:
    from fedguard.experiment import config as config_mod
    from fedguard.experiment.assembly import Experiment

    cfg = config_mod.load(args.config, args.overrides)
    exp = Experiment(cfg)
    exp.close()
    cohort = f"{cfg.clients_per_round} per round"
    if cfg.server.mode == "async":
        cohort = f"async: {cfg.concurrency} at once, a step every {cfg.buffer_size} replies"
    console.print(
        f"{args.config}: valid — {len(exp.client_ids)} clients, {cohort}, "
        f"{cfg.experiment.rounds} rounds, model {cfg.model.name} ({cfg.model.framework}, "
        f"{exp.model.spec.size:,} parameters), strategy {cfg.server.strategy}"
    )
    return 0


def _server(args: argparse.Namespace, console: Console, err: Console) -> int:
    from fedguard.experiment import deployment as grpc_deploy
    from fedguard.runtime import grpc_tls

    if (args.tls_cert is None) != (args.tls_key is None):
        raise _config_error("--tls-cert and --tls-key go together.")
    for flag, path in (
        ("--tls-cert", args.tls_cert),
        ("--tls-key", args.tls_key),
        ("--client-ca", args.client_ca),
        ("--tokens", args.tokens),
        ("--identities", args.identities),
        ("--he-params", args.he_params),
    ):
        _readable(flag, path)
    tls = None
    if args.tls_cert is not None:
        tls = grpc_tls.ServerTls(args.tls_cert, args.tls_key, args.client_ca)
    elif args.client_ca is not None:
        raise _config_error("--client-ca needs --tls-cert and --tls-key.")
    if args.tokens is None and args.client_ca is None:
        raise _config_error("The server needs client authentication: --tokens or --client-ca.")
    try:
        if tls is None:  # refuse before loading anything
            grpc_tls.refuse_plaintext(args.address, args.insecure)
    except grpc_tls.TlsConfigError as exc:
        raise _config_error(str(exc)) from None
    if args.max_payload_mib < 1:
        raise _config_error(f"--max-payload-mib must be at least 1, got {args.max_payload_mib}.")
    options = grpc_deploy.ServerOptions(
        address=args.address,
        tls=tls,
        tokens=args.tokens,
        insecure=args.insecure,
        wait_for_clients_s=args.wait_clients,
        round_deadline_s=args.round_deadline,
        max_payload_bytes=args.max_payload_mib << 20,
        identities=args.identities,
        he_params=args.he_params,
    )
    if not args.quiet:  # the deadline in force and, while a round waits, who has replied
        logging.getLogger("fedguard.grpc").setLevel(logging.INFO)
    dashboard = None
    if args.dashboard is not None:
        from fedguard.experiment import config as config_mod
        from fedguard.observe import serve

        out = args.out
        if out is None:
            out = Path("runs") / config_mod.load(args.config, args.overrides).experiment.name
        dashboard = _start_dashboard(args, [out], serve)
        scheme = "https" if args.tls_cert is not None else "http"
        err.print(f"dashboard on {scheme}://{args.dashboard}/", highlight=False)
    elif args.viewer_tokens is not None:
        raise _config_error("--viewer-tokens goes with --dashboard HOST:PORT.")
    try:
        return _exit_code_of_run(
            lambda: grpc_deploy.serve(
                args.config,
                options,
                out=args.out,
                resume=args.resume,
                overrides=args.overrides,
                progress=not args.quiet,
            ),
            err,
        )
    except grpc_tls.TlsConfigError as exc:
        raise _config_error(str(exc)) from None
    finally:
        if dashboard is not None:
            dashboard.stop()


def _start_dashboard(args: argparse.Namespace, run_dirs: list[Path], serve) -> Any:
    """The deployment server's dashboard, on a background thread (its TLS certificate, when
    it has one, serves HTTPS)."""
    _readable("--viewer-tokens", args.viewer_tokens)
    options = serve.DashboardOptions(
        address=args.dashboard,
        viewers=args.viewer_tokens,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )
    try:
        background = serve.Background(run_dirs, options)
        background.start()
    except serve.DashboardConfigError as exc:
        raise _config_error(str(exc)) from None
    return background


def _dashboard(args: argparse.Namespace, console: Console, err: Console) -> int:
    """``fedguard dashboard``: serve the page until Ctrl-C; a folder that is not a run is
    refused (one that does not exist yet is followed: a run about to start)."""
    from fedguard.observe import runview, serve

    for flag, path in (
        ("--viewer-tokens", args.viewer_tokens),
        ("--tls-cert", args.tls_cert),
        ("--tls-key", args.tls_key),
    ):
        problem = _unreadable(flag, path)
        if problem is not None:
            raise _Refused(problem)
    for run_dir in args.run_dirs:
        if run_dir.exists():
            try:
                runview.check_run_dir(run_dir)
            except runview.NotARunError as exc:
                raise _Refused(str(exc)) from None
    if args.poll_ms < 100:
        raise _Refused(f"--poll-ms must be at least 100, got {args.poll_ms}.")
    options = serve.DashboardOptions(
        address=args.dashboard,
        viewers=args.viewer_tokens,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        poll_ms=args.poll_ms,
    )
    scheme = "https" if args.tls_cert is not None else "http"
    console.print(
        f"dashboard of {len(args.run_dirs)} run(s) on {scheme}://{args.dashboard}/ (Ctrl-C stops)",
        highlight=False,
    )
    try:
        serve.serve_forever(args.run_dirs, options)
    except serve.DashboardConfigError as exc:
        raise _Refused(str(exc)) from None
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return 0


def _report(args: argparse.Namespace, console: Console, err: Console) -> int:
    """``fedguard report``: one self-contained HTML file of a run folder."""
    from fedguard.observe import report, runview

    try:
        runview.check_run_dir(args.run_dir)
        path = report.write_report(args.run_dir, args.out)
    except runview.NotARunError as exc:
        raise _Refused(str(exc)) from None
    console.print(f"report in [bold]{path}[/bold]")
    return 0


def _client(args: argparse.Namespace, console: Console, err: Console) -> int:
    from fedguard.experiment import deployment as grpc_deploy
    from fedguard.protocol import registration
    from fedguard.runtime import grpc_client, grpc_tls

    if args.token_file is None and args.cert is None:
        raise _config_error("The client needs a credential: --token-file or --cert/--key.")
    for flag, path in (
        ("--token-file", args.token_file),
        ("--ca", args.ca),
        ("--cert", args.cert),
        ("--key", args.key),
        ("--identity", args.identity),
        ("--identities", args.identities),
        ("--he-key", args.he_key),
    ):
        _readable(flag, path)
    if (args.identity is None) != (args.identities is None):
        raise _config_error("--identity and --identities go together.")
    try:
        if args.ca is None:  # refuse before loading anything
            grpc_tls.refuse_plaintext(args.server, args.insecure)
    except grpc_tls.TlsConfigError as exc:
        raise _config_error(str(exc)) from None
    if args.data is None and (args.eval_data is not None or args.eval_fraction):
        raise _config_error("--eval-data and --eval-fraction go with --data.")
    _readable("--eval-data", args.eval_data)
    if args.data is not None:
        if args.model is None or args.num_classes is None:
            raise _config_error("--data needs --model and --num-classes.")
        from fedguard.experiment import config as config_mod

        experiment = None
        if args.config is not None:  # its privacy settings, not its data set
            experiment = config_mod.load(args.config, args.overrides)
        app = grpc_deploy.data_app(
            args.data,
            args.client_id,
            model=args.model,
            framework=args.framework,
            num_classes=args.num_classes,
            experiment=experiment,
            eval_data=args.eval_data,
            eval_fraction=args.eval_fraction,
            state_dir=args.state_dir,
        )
        if experiment is None:
            err.print(
                "[yellow]warning:[/yellow] without the experiment file this client holds the "
                "server to no privacy settings (secure aggregation, DP): give FILE.toml to pin "
                "them.",
                highlight=False,
                soft_wrap=True,
            )
    elif args.config is not None:
        app = grpc_deploy.demo_app(
            args.config, args.client_id, args.overrides, state_dir=args.state_dir
        )
    else:
        raise _config_error("The client needs its data: --data FILE.npz, or an experiment file.")
    if args.identity is not None:
        try:
            grpc_deploy.identify(app, args.identity, args.identities, args.client_id)
        except ValueError as exc:
            raise _config_error(str(exc)) from None
    if args.he_key is not None:
        from fedguard.experiment import config as config_mod

        known = None if args.config is None else config_mod.load(args.config, args.overrides)
        grpc_deploy.give_he_key(app, args.he_key, known)
    elif app.pins.homomorphic is not None:
        raise _config_error(
            'secure_aggregation.mode = "ckks" needs --he-key: the federation\'s key file '
            "(he-client.key made by fedguard he-keys)"
        )
    if args.identity is None and app.pins.secure_aggregation is not None:
        err.print(
            "[yellow]warning:[/yellow] without --identity and --identities this client takes "
            "part in secure aggregation only against an honest-but-curious server (no signed "
            "keys or consistency check).",
            highlight=False,
            soft_wrap=True,
        )
    token = b"" if args.token_file is None else args.token_file.read_bytes().strip()
    tls = None if args.ca is None else grpc_tls.ClientTls(args.ca, args.cert, args.key)
    settings = grpc_client.ClientSettings(
        address=args.server,
        client_id=args.client_id,
        token=token,
        tls=tls,
        insecure=args.insecure,
        give_up_after_s=args.give_up_after,
    )
    try:
        answered = grpc_deploy.run_client(settings, app)
    except grpc_tls.TlsConfigError as exc:
        raise _config_error(str(exc)) from None
    except grpc_client.ClientRefusedError as exc:
        err.print(f"[red]error:[/red] {exc}")
        return EXIT_REFUSED
    except grpc_client.ServerGoneError as exc:
        err.print(f"[red]error:[/red] {exc}")
        return EXIT_FAILED
    except registration.RegistrationRefused as exc:
        raise _config_error(str(exc)) from None
    console.print(f"client {args.client_id}: the run is finished ({answered} tasks answered)")
    return 0


def _launch(args: argparse.Namespace, console: Console, err: Console) -> int:
    from fedguard.experiment import config as config_mod
    from fedguard.runtime import grpc_launch

    if args.clients < 1:
        raise _config_error(f"--clients must be at least 1, got {args.clients}.")
    sa = config_mod.load(args.config, args.overrides).secure_aggregation
    try:
        return grpc_launch.launch(
            args.config,
            args.clients,
            out=args.out,
            insecure=args.insecure,
            resume=args.resume,
            overrides=args.overrides,
            round_deadline_s=args.round_deadline,
            dashboard=args.dashboard,
            he_scheme=sa.he_scheme if sa.enabled and sa.mode == "ckks" else None,
        )
    except KeyboardInterrupt:
        err.print("[yellow]Stopped; every launched process was stopped too.[/yellow]")
        return EXIT_INTERRUPTED


def _certs(args: argparse.Namespace, console: Console, err: Console) -> int:
    from fedguard.runtime import certs, identities

    pki = certs.make_dev_pki(args.directory, client_ids=range(args.clients), hosts=args.host)
    console.print(f"CA {pki.ca_cert}, server {pki.server_cert}, {args.clients} client certificates")
    console.print(
        f"The CA's private key is in {pki.ca_key.parent}/: keep it there and never copy that "
        "folder to clients or the server (clients need only ca.pem and their own client-N files)."
    )
    if (args.directory / "ca.key").exists():
        err.print(
            f"[yellow]warning:[/yellow] {args.directory / 'ca.key'} is an older CA key left "
            "beside the files handed out; it is not this CA's key: delete it.",
            highlight=False,
            soft_wrap=True,
        )
    if args.tokens:
        identities.make_credentials(args.directory, range(args.clients))
        console.print(
            f"tokens in {args.directory / 'tokens.json'} and client-N.token; identity keys in "
            "client-N.identity, their public keys in identities.json"
        )
    return 0


def _he_keys(args: argparse.Namespace, console: Console, err: Console) -> int:
    """``fedguard he-keys DIR``: one secret key for the federation, two files."""
    from fedguard.runtime import he_keys

    client, server = he_keys.make_keys(args.directory, args.scheme)
    console.print(
        f"HE key ({args.scheme}) for every client in {client} (hand it to each client over a "
        f"channel the server does not control: --he-key); the server gets {server} "
        "(--he-params), which decrypts nothing",
        highlight=False,
        soft_wrap=True,
    )
    return 0


def _tokens(args: argparse.Namespace, console: Console, err: Console) -> int:
    from fedguard.runtime import auth, identities

    if args.clients:
        identities.make_credentials(args.directory, range(args.clients))
        console.print(
            f"tokens and identity keys for clients 0..{args.clients - 1} in {args.directory} "
            "(hand each client its client-N.token, client-N.identity and identities.json; the "
            "server gets tokens.json and identities.json)"
        )
    for cid in args.revoke:
        try:
            auth.revoke(args.directory / "tokens.json", cid)
        except ValueError as exc:
            raise _config_error(str(exc)) from None
        console.print(f"client {cid} revoked")
    from fedguard.observe import access

    try:
        for name in args.viewer:
            path = access.make_viewer(args.directory, name)
            console.print(
                f"viewer token in {path} (read-only: opens the dashboard, never a client "
                f"session); the dashboard gets {args.directory / access.VIEWERS_FILE}"
            )
        for name in args.revoke_viewer:
            access.revoke_viewer(args.directory / access.VIEWERS_FILE, name)
            console.print(f"viewer {name} revoked")
    except ValueError as exc:
        raise _config_error(str(exc)) from None
    return 0


def _config_error(message: str) -> Exception:
    from fedguard.experiment.config import ConfigError

    return ConfigError(message)


_DEPLOY = {
    "server": _server,
    "client": _client,
    "launch": _launch,
    "certs": _certs,
    "tokens": _tokens,
    "he-keys": _he_keys,
}


_OBSERVE = {"dashboard": _dashboard, "report": _report}


if __name__ == "__main__":
    sys.exit(main())
