"""Mutation testing of the privacy, secure-aggregation and robustness code with mutmut.

mutmut copies ``src/`` to ``mutants/``, writes every mutant of the modules it is told to mutate
into that copy behind a switch, and runs the tests that reach each mutated function with that one
mutant switched on. A mutant is *killed* when some test fails, *survives* when they all pass.

The modules in scope (``[tool.mutmut] only_mutate`` of pyproject.toml) are split into the groups
of ``GROUPS`` below, each with its own narrow test selection: the unit tests of its modules and
``tests/test_mutants_<module>*.py``. A mutant of a group is run against those tests only, never
against whole runs, gRPC processes or another group's tests, so its score is a lower bound (more
tests could only kill more). Each group runs in its own git-ignored work folder
``mutants-work/<group>/``, which holds symlinks to ``src/`` and ``tests/`` and a generated
``pyproject.toml``: this checkout's, with ``[tool.mutmut]``'s ``only_mutate`` and
``pytest_add_cli_args_test_selection`` set to the group's. mutmut, started there, keeps its copy
and its verdicts in ``mutants-work/<group>/mutants/``; the repository's pyproject.toml is never
rewritten.

This script runs mutmut one module at a time (so that a stop loses at most one module), then
reads mutmut's per-file results and writes ``benchmarks/results/mutation.json``: per module the
number of mutants, killed, survived, timeouts and mutants no test reaches, the score (killed +
timeout over all mutants but skipped and not yet checked ones), and every surviving mutant with
its diff and the reviewed reason it is harmless, taken from ``benchmarks/mutation_reasons.json``.

    python benchmarks/mutation.py                          # every configured module
    python benchmarks/mutation.py driver dp_sgd            # a subset (file stem, dotted or path)
    python benchmarks/mutation.py robust                   # every module of a group
    python benchmarks/mutation.py --report-only            # rewrite the JSON from mutants-work/
    python benchmarks/mutation.py --all accounting         # retest killed mutants too
    python benchmarks/mutation.py --fresh-stats dp_sgd     # re-record which tests reach what
    python benchmarks/mutation.py "driver:x_*sample*"      # only some functions of a module
    python benchmarks/mutation.py --groups                 # list the groups and their tests

Mutants already killed stay killed across runs (mutmut keeps its results in the work folder and
resets those of every function whose source changed); untested and surviving ones are tested
again, so that new tests count. The mutants of a changed or new function have names mutmut's old
results do not know, so every module gets a second mutmut pass for the mutants still without a
result. mutmut records which tests reach which function once per work folder and afterwards only for
new tests: a test that has started to reach a new or renamed function is not run against its
mutants, which then survive. ``--fresh-stats`` deletes the group's record (``mutmut-stats.json``)
so that mutmut records it again from all tests; verdicts are kept. Delete ``mutants-work/`` (or
one group's folder) for a run from scratch.

A reason in ``mutation_reasons.json`` is keyed by ``module:function:hash``, the hash being that
of the mutant's diff without line numbers, so that it survives renumbering when other code of the
function changes; the key of every survivor is listed in the JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import hashlib
import importlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "mutation.json"
REASONS = ROOT / "benchmarks" / "mutation_reasons.json"
WORK = ROOT / "mutants-work"  # one mutmut work folder per group (git-ignored)
PRELOAD_ENV = "FEDGUARD_MUTATION_PRELOAD"


@dataclasses.dataclass(frozen=True)
class Group:
    """Modules mutated together and the only tests run against their mutants."""

    modules: tuple[str, ...]  # globs of source paths relative to the checkout
    tests: tuple[str, ...]  # file names (globs) in tests/, pytest's python_files for the group
    deselect: tuple[str, ...] = ()  # test ids left out (whole runs inside a unit-test file)
    # what tests load inside their bodies and takes seconds: a module to import or a
    # ``module:function`` to call, once, in the process mutmut forks each mutant's run from (see
    # pytest_configure below)
    preload: tuple[str, ...] = ()


# The test selection of each group: the unit-test files of its modules (found by what they
# import) and tests/test_mutants_<module>*.py, which pin the numbers the unit tests leave loose.
# Whole runs (tests/test_*_runs.py, test_runner.py, the run tests of test_distributed_dp.py),
# gRPC processes, the CLI and other groups' tests are not run against a group's mutants: they
# would cost from seconds to minutes per mutant, and fewer tests can only kill fewer mutants, so
# each score is a lower bound.
GROUPS: dict[str, Group] = {
    "privacy": Group(
        modules=("src/fedguard/algorithms/privacy/*.py",),
        tests=(
            "test_accounting.py",
            "test_distributed_dp.py",
            "test_dp_fedavg.py",
            "test_mutants_accounting*.py",
            "test_mutants_distributed_dp*.py",
            "test_mutants_dp_fedavg*.py",
        ),
        deselect=(
            "tests/test_distributed_dp.py::test_run_reports_the_directly_accounted_epsilon",
            "tests/test_distributed_dp.py::test_target_epsilon_calibrates_the_skellam_noise",
        ),
    ),
    "secagg": Group(
        modules=("src/fedguard/algorithms/secagg/*.py",),
        tests=("test_secagg_math.py", "test_secagg_protocol.py", "test_mutants_secagg_*.py"),
    ),
    "robust": Group(
        modules=("src/fedguard/algorithms/robust/*.py",),
        tests=(
            "test_robust.py",
            "test_robust_bucketing.py",
            "test_robust_left_out.py",
            "test_mutants_robust*.py",
        ),
        deselect=(  # whole runs: the unit tests of the same file cover the selections
            "tests/test_robust_left_out.py::test_a_run_under_multi_krum_shows_the_boosting_client_left_out",
            "tests/test_robust_left_out.py::test_a_run_under_the_trimmed_mean_shows_the_share_cut_of_each_client",
        ),
    ),
    "optimizers": Group(
        modules=("src/fedguard/algorithms/optimizers/*.py",),
        tests=(
            "test_aggregation.py",
            "test_server_optimizers.py",
            "test_scaffold_newton.py",
            "test_mutants_aggregation*.py",
            "test_mutants_server_optimizers*.py",
            "test_mutants_scaffold_newton*.py",
            "test_mutants_fedbuff*.py",
            "test_mutants_stacked*.py",
            "test_feddyn_fednova.py",
            "test_mutants_feddyn_fednova*.py",
        ),
        deselect=(  # a whole experiment twice, checkpointed: the unit tests above cover the math
            "tests/test_feddyn_fednova.py::test_feddyn_state_of_server_and_clients_survives_a_checkpoint",
        ),
    ),
    "paramspec": Group(
        modules=("src/fedguard/models/paramspec.py",),
        tests=("test_paramspec.py", "test_mutants_paramspec*.py"),
    ),
    "dp_sgd_client": Group(
        modules=("src/fedguard/client/dp_sgd.py", "src/fedguard/client/per_example_grads.py"),
        tests=("test_dp_sgd.py", "test_mutants_dp_sgd*.py", "test_mutants_per_example_grads*.py"),
        # test_keras_model_is_refused imports Keras (about 10 s); the first torch.func.vmap
        # call takes about 1.5 s
        preload=("keras", "mutation:warm_torch_func"),
    ),
    "driver": Group(
        modules=("src/fedguard/protocol/driver.py",),
        tests=("test_driver.py", "test_mutants_driver*.py"),
    ),
}
OUT_OF_SCOPE = (
    "src/fedguard/algorithms/attacks/ (the simulated attacks), src/fedguard/algorithms/"
    "contribution/ (contribution scores), seeding.py, finite.py and binned_auc.py are not mutated: "
    "the issue's scope is the DP, accounting, secure-aggregation, robust-aggregation, aggregation "
    "and server-optimizer math, the parameter layout, the DP-SGD client and the round driver"
)

# mutmut's exit-code -> status table (mutmut/stats.py)
STATUS = {
    1: "killed",
    3: "killed",
    0: "survived",
    5: "no_tests",
    33: "no_tests",
    34: "skipped",
    35: "suspicious",
    36: "timeout",
    37: "caught_by_type_check",
    -24: "timeout",
    24: "timeout",
    152: "timeout",
    255: "timeout",
    2: "interrupted",
    -11: "segfault",
    -9: "segfault",
    None: "not_checked",
}
FIELDS = (
    "killed",
    "survived",
    "timeout",
    "no_tests",
    "skipped",
    "suspicious",
    "segfault",
    "caught_by_type_check",
    "interrupted",
    "not_checked",
)
UNDETECTED = ("survived", "no_tests", "suspicious")


def configured_modules() -> list[str]:
    """Source paths (``src/...py``) that ``[tool.mutmut] only_mutate`` selects."""
    cfg = mutmut_config()
    paths = []
    for src in cfg["source_paths"]:
        for path in sorted((ROOT / src).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if any(fnmatch.fnmatch(rel, pattern) for pattern in cfg["only_mutate"]):
                paths.append(rel)
    return paths


def mutmut_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]


def group_of(module: str) -> str:
    """The one group whose globs match ``module``."""
    hits = [
        g for g, group in GROUPS.items() if any(fnmatch.fnmatch(module, p) for p in group.modules)
    ]
    if len(hits) != 1:
        sys.exit(f"{module} is in {len(hits)} groups of benchmarks/mutation.py ({hits}), not 1")
    return hits[0]


def dotted(path: str) -> str:
    """``src/fedguard/algorithms/privacy/accounting.py`` -> ``fedguard.algorithms.privacy.accounting``
    (a package's ``__init__.py`` is the package, as in mutmut's mutant names)."""
    name = path.removesuffix(".py").replace("/", ".")
    return name.removeprefix("src.").removesuffix(".__init__")


def select(names: list[str], modules: list[str]) -> list[str]:
    """The modules named: a group (all its modules), or a module by path, dotted name, file stem
    or dotted suffix; ``module:glob`` (``driver:x_*sample*``) keeps only the functions whose
    mangled name matches the glob."""
    if not names:
        return modules
    chosen = []
    for name in names:
        name, _, functions = name.partition(":")
        if name in GROUPS:
            hits = [m for m in modules if group_of(m) == name]
        else:
            hits = [
                m
                for m in modules
                if name in (m, dotted(m), Path(m).stem) or dotted(m).endswith(name)
            ]
        if not hits:
            sys.exit(
                f"{name!r} is none of the groups {list(GROUPS)} nor of the configured modules: "
                f"{[dotted(m) for m in modules]}"
            )
        chosen += [f"{m}:{functions}" if functions else m for m in hits if m not in chosen]
    return chosen


def group_pyproject(name: str, modules: list[str]) -> str:
    """This checkout's pyproject.toml with ``[tool.mutmut]`` narrowed to the group: its modules
    and its tests; every other table (pytest's settings among them) and every other mutmut
    setting as they are."""
    text = (ROOT / "pyproject.toml").read_text()
    group = GROUPS[name]
    cfg = mutmut_config() | {
        "only_mutate": [m for m in modules if group_of(m) == name],
        "pytest_add_cli_args_test_selection": [
            "tests",
            "-o",
            "python_files=" + " ".join(group.tests),
            *(f"--deselect={test}" for test in group.deselect),
        ],
    }
    headers = [m.start() for m in re.finditer(r"^\[\[?[^\]\n]+\]\]?[ \t]*$", text, flags=re.M)]
    start = text.index("[tool.mutmut]\n")
    end = min([h for h in headers if h > start], default=len(text))
    table = [
        "[tool.mutmut]",
        f"# Generated by benchmarks/mutation.py for the group {name!r}: do not edit; the checkout's",
        "# [tool.mutmut] with the group's modules and test selection.",
        *(f"{key} = {json.dumps(value)}" for key, value in cfg.items()),
    ]
    result = text[:start] + "\n".join(table) + "\n\n" + text[end:]
    if tomllib.loads(result)["tool"]["mutmut"] != cfg:
        raise RuntimeError(f"the generated [tool.mutmut] of {name} does not read back")
    return result


def work_folder(name: str, modules: list[str]) -> Path:
    """``mutants-work/<group>/``: symlinks to this checkout's src/ and tests/ and the group's
    pyproject.toml. mutmut copies both into its ``mutants/`` there (the symlinks are followed),
    so the tests' own paths (conftest.py's ``parents[1]``) are those of that copy, as in a run
    from the checkout."""
    folder = WORK / name
    folder.mkdir(parents=True, exist_ok=True)
    for sub in ("src", "tests"):
        link = folder / sub
        if not link.is_symlink():
            link.symlink_to(Path("..", "..", sub), target_is_directory=True)
    text = group_pyproject(name, modules)
    cfg = folder / "pyproject.toml"
    if not cfg.exists() or cfg.read_text() != text:
        cfg.write_text(text)
    return folder


def load_meta(module: str) -> dict[str, int | None] | None:
    meta = WORK / group_of(module) / "mutants" / f"{module}.meta"
    if not meta.exists():
        return None
    return json.loads(meta.read_text())["exit_code_by_key"]


def run_modules(
    modules: list[str],
    everything: list[str],
    *,
    max_children: int,
    rerun_all: bool,
    unchecked_only: bool = False,
) -> float | None:
    """Test the mutants of ``modules`` (all of one group) in one mutmut run in the group's work
    folder; the wall seconds, None if none pending.

    Killed mutants are kept unless ``rerun_all``; the rest (untested, surviving, untested by
    any test) are tested again; with ``unchecked_only``, only those mutmut has no result for
    (see :func:`run_until_checked`)."""
    (name,) = {group_of(entry.partition(":")[0]) for entry in modules}
    targets: list[str] = []
    for entry in modules:
        module, _, functions = entry.partition(":")
        pattern = f"{dotted(module)}.{functions or 'x*'}"
        if functions and not functions.endswith("*"):
            pattern += "*"
        codes = load_meta(module)
        if codes is None or rerun_all:
            targets.append(pattern)
            continue
        codes = {k: c for k, c in codes.items() if fnmatch.fnmatch(k, pattern)}
        if unchecked_only:
            targets += [k for k, c in codes.items() if c is None]
            continue
        pending = [k for k, c in codes.items() if STATUS.get(c, "suspicious") != "killed"]
        targets += pending if len(pending) < len(codes) else [pattern]
    if not targets:
        return None
    folder = work_folder(name, everything)
    env = dict(os.environ)
    # Tests that start a child interpreter import this checkout's unmutated source rather than
    # whatever an editable install points at; mutmut itself puts mutants/src first on its own
    # sys.path.
    # This file is also a pytest plugin (see pytest_collection_modifyitems below), loaded in
    # every pytest run mutmut makes: it puts the quickest tests first, which with mutmut's -x
    # ends a killed mutant's run at its first failing quick test.
    path = [str(ROOT / "src"), str(Path(__file__).resolve().parent), env.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, path))
    env["PYTEST_ADDOPTS"] = " ".join(filter(None, [env.get("PYTEST_ADDOPTS"), "-p", "mutation"]))
    env[PRELOAD_ENV] = " ".join(GROUPS[name].preload)
    # mutmut forks every mutant's run from a process that has already run tests; a child that
    # enters an OpenMP parallel region its parent had started (oneDNN's convolutions) waits
    # forever at libgomp's team barrier for threads that fork did not copy. One thread per
    # process avoids that hang (which mutmut would count as a timeout, i.e. killed) and suits
    # max_children workers anyway.
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = "1"
    exe = Path(sys.executable).with_name("mutmut")
    cmd = [str(exe) if exe.exists() else "mutmut", "run", "--max-children", str(max_children)]
    print(f"== {name}: {', '.join(modules)}: {len(targets)} mutants or globs", flush=True)
    start = time.perf_counter()
    proc = subprocess.run([*cmd, *targets], cwd=folder, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        print(f"mutmut run exited with {proc.returncode}", file=sys.stderr)
    return seconds


def run_until_checked(
    modules: list[str], everything: list[str], *, max_children: int, rerun_all: bool
) -> float | None:
    """:func:`run_modules`, then once more for the mutants left without a result.

    The first run picks its targets from mutmut's results before mutmut regenerates the
    mutants: the mutants of a function whose source changed (or of a new function) get new
    names there, which no target matched, so they are left unchecked until a second run."""
    took = run_modules(modules, everything, max_children=max_children, rerun_all=rerun_all)
    if took is None:
        return None
    again = run_modules(
        modules, everything, max_children=max_children, rerun_all=False, unchecked_only=True
    )
    return took + (again or 0.0)


def diff_of(name: str, module: str) -> str:
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    cwd = os.getcwd()
    os.chdir(WORK / group_of(module))  # mutmut reads mutants/ relative to the working directory
    try:
        return get_diff_for_mutant(name, path=module)
    except Exception as exc:  # a mutant mutmut cannot show any more: keep the row
        return f"<no diff: {exc!r}>"
    finally:
        os.chdir(cwd)


def stable_key(name: str, diff: str) -> str:
    """``module:function:hash`` of the changed lines, independent of mutant numbering."""
    function = name.rpartition("__mutmut_")[0]
    body = "\n".join(
        line.strip()
        for line in diff.splitlines()
        if line[:1] in "+-" and not line.startswith(("+++", "---"))
    )
    return f"{function}:{hashlib.sha1(body.encode()).hexdigest()[:10]}"


def git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()


def report(modules: list[str], seconds: dict[str, float], elapsed: float | None, old: dict) -> dict:
    """The JSON: ``seconds`` are this invocation's per module, ``old`` the JSON before it."""
    reasons = json.loads(REASONS.read_text()) if REASONS.exists() else {}
    head = git("rev-parse", "HEAD")
    old_modules = old.get("modules", {})
    rows: dict[str, dict] = {}
    survivors = []
    # counts per field, then the scores and seconds derived from them
    total: dict[str, Any] = dict.fromkeys(FIELDS, 0) | {"mutants": 0}
    for module in modules:
        codes = load_meta(module)
        if codes is None:
            continue
        counts = dict.fromkeys(FIELDS, 0)
        for name, code in sorted(codes.items(), key=lambda kv: _natural(kv[0])):
            status = STATUS.get(code, "suspicious")
            counts[status] += 1
            if status in UNDETECTED:
                diff = diff_of(name, module)
                key = stable_key(name, diff)
                survivors.append(
                    {
                        "mutant": name,
                        "module": module,
                        "function": name.rpartition("__mutmut_")[0].rpartition(".")[2],
                        "status": status,
                        "key": key,
                        "diff": "\n".join(diff.splitlines()[2:]),  # without the ---/+++ header
                        "reason": reasons.get(key, reasons.get(name)),
                    }
                )
        row = {"group": group_of(module), "mutants": len(codes)} | counts
        row["score"] = _score(row)
        before = old_modules.get(module, {})
        if module in seconds:
            # the last mutmut run of the module: its commit and wall seconds (mutmut's start
            # included), and the seconds of every run since its row appeared
            row["commit"] = head
            row["seconds"] = round(seconds[module], 1)
            row["seconds_all_runs"] = round(
                before.get("seconds_all_runs", 0.0) + seconds[module], 1
            )
        else:
            row |= {k: before[k] for k in ("commit", "seconds", "seconds_all_runs") if k in before}
        rows[module] = row
        for f in ("mutants", *FIELDS):
            total[f] += row[f]
    total["score"] = _score(total)
    total["seconds"] = round(sum(r.get("seconds", 0.0) for r in rows.values()), 1)
    total["seconds_all_runs"] = round(sum(r.get("seconds_all_runs", 0.0) for r in rows.values()), 1)
    explained = sum(1 for s in survivors if s["reason"])
    total["undetected_with_reason"] = explained
    total["score_counting_reviewed_survivors"] = _score(total, extra=explained)
    dirty = git("status", "--porcelain", "--", *modules, "tests")
    return {
        "tool": "mutmut",
        "version": importlib.metadata.version("mutmut"),
        "commit": head,
        "uncommitted_changes_in_scope": bool(dirty),
        "score_definition": "(killed + timeout) / (mutants - skipped - not_checked); "
        "survived, no_tests and suspicious mutants are undetected and listed under survivors",
        "notes": [
            "Each module's mutants are run against its group's tests only (groups below: the "
            "unit tests of the group's modules and tests/test_mutants_<module>*.py), not against "
            "whole runs, gRPC processes or other groups' tests; fewer tests can only kill fewer "
            "mutants, so every score is a lower bound.",
            "A module row's commit is the checkout's commit at its last mutmut run; mutmut "
            "retests every function whose source changed since, so a verdict is that of the "
            "source at the top-level commit when uncommitted_changes_in_scope is false.",
            "The wording of error and log messages is not mutated (do_not_mutate_patterns in "
            "pyproject.toml's [tool.mutmut]).",
            "Out of scope: " + OUT_OF_SCOPE + ".",
        ],
        "groups": {
            name: {
                "modules": [m for m in modules if group_of(m) == name],
                "tests": list(group.tests),
                "deselected": list(group.deselect),
            }
            for name, group in GROUPS.items()
        },
        "modules": rows,
        "total": total,
        "survivors": survivors,
        "seconds": round(elapsed, 1) if elapsed is not None else old.get("seconds"),
    }


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")


def _score(row: dict, extra: int = 0) -> float | None:
    tested = row["mutants"] - row["skipped"] - row["not_checked"]
    return round((row["killed"] + row["timeout"] + extra) / tested, 4) if tested else None


def _natural(name: str) -> tuple[str, int]:
    head, _, number = name.rpartition("__mutmut_")
    return head, int(number) if number.isdigit() else 0


def pytest_configure(config: object) -> None:
    """Load what a test's first ``torch.testing.assert_close`` loads (about 5 s of lazy imports
    of torch._dynamo) and the group's ``preload`` modules: mutmut forks every mutant's run from
    a process that collected the tests and so ran this hook, and without it each run would load
    them again. Loading modules changes no test's outcome."""
    os.environ.setdefault("KERAS_BACKEND", "torch")  # as tests/conftest.py sets it
    for entry in os.environ.get(PRELOAD_ENV, "").split():
        module, _, function = entry.partition(":")
        loaded = importlib.import_module(module)
        if function:
            getattr(loaded, function)()
    try:
        import torch
    except ImportError:
        return
    torch.testing.assert_close(torch.zeros(1), torch.zeros(1))


def warm_torch_func() -> None:
    """One small ``vmap(grad_and_value(...))``, as the DP-SGD fallback engine runs it."""
    import torch
    import torch.nn.functional as F

    layer = torch.nn.Sequential(torch.nn.Conv2d(2, 2, 1, groups=2), torch.nn.Flatten())
    params = {name: p.detach() for name, p in layer.named_parameters()}

    def loss(p: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(layer, p, (x[None],))
        return F.nll_loss(torch.log_softmax(out, -1), y[None], reduction="sum")

    batched = torch.func.vmap(
        torch.func.grad_and_value(loss), in_dims=(None, 0, 0), randomness="different"
    )
    batched(params, torch.zeros(3, 2, 1, 1), torch.zeros(3, dtype=torch.long))


def pytest_collection_modifyitems(items: list) -> None:
    """Quickest tests first, by the durations mutmut recorded (``mutmut-stats.json`` in the
    working directory ``mutants/``); unknown tests, the new ones, first of all."""
    stats = Path("mutmut-stats.json")
    if not stats.exists():
        return
    durations = json.loads(stats.read_text()).get("duration_by_test", {})
    items.sort(key=lambda item: durations.get(item.nodeid, 0.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "modules", nargs="*", help="group, file stem, dotted name or path; default all"
    )
    parser.add_argument("--max-children", type=int, default=2, help="parallel mutant workers")
    parser.add_argument("--all", action="store_true", help="retest killed mutants too")
    parser.add_argument(
        "--fresh-stats",
        action="store_true",
        help="record again which tests reach which function (after new or renamed functions)",
    )
    parser.add_argument("--together", action="store_true", help="one mutmut run per group")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the JSON")
    parser.add_argument("--groups", action="store_true", help="list the groups and exit")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    out: Path = args.out

    everything = configured_modules()
    if args.groups:
        for name, group in GROUPS.items():
            print(f"{name}: {' '.join(m for m in everything if group_of(m) == name)}")
            print(f"    tests: {' '.join(group.tests)}")
            for test in group.deselect:
                print(f"    deselected: {test}")
        return
    for module in everything:
        group_of(module)  # every module in scope is in exactly one group
    chosen = select(args.modules, everything)
    if args.fresh_stats and not args.report_only:
        for name in sorted({group_of(m.partition(":")[0]) for m in chosen}):
            (WORK / name / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
    old = json.loads(out.read_text()) if out.exists() else {}
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    if not args.report_only:
        # one module per mutmut run, so that a stop loses little and the time per module is
        # known; --together runs a group's chosen modules in one, which saves mutmut's clean
        # run and forced-fail run per module (its stats run is made once per work folder)
        if args.together:
            runs = [[m for m in chosen if group_of(m.partition(":")[0]) == g] for g in GROUPS]
            runs = [run for run in runs if run]
        else:
            runs = [[m] for m in chosen]
        for run in runs:
            took = run_until_checked(
                run, everything, max_children=args.max_children, rerun_all=args.all
            )
            if took is not None:
                for entry in run:
                    module = entry.partition(":")[0]
                    seconds[module] = seconds.get(module, 0.0) + took / len(run)
            # write after every module, so that an interrupted run still leaves a report
            write(report(everything, seconds, time.perf_counter() - start, old), out)
    elapsed = None if args.report_only else time.perf_counter() - start
    result = report(everything, seconds, elapsed, old)
    write(result, out)
    t = result["total"]
    for module, row in result["modules"].items():
        print(
            f"{module:52s} {row['mutants']:5d} mutants  {row['killed'] + row['timeout']:5d} killed  "
            f"{row['survived'] + row['no_tests'] + row['suspicious']:4d} undetected  "
            f"{row['not_checked']:4d} not checked  score {row['score']}"
        )
    print(
        f"total: {t['mutants']} mutants, score {t['score']}, "
        f"{len(result['survivors'])} undetected ({t['undetected_with_reason']} with a reason)"
    )


if __name__ == "__main__":
    main()
