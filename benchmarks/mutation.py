"""Mutation testing of the privacy, secure-aggregation and robustness code with mutmut.

mutmut (configured in ``[tool.mutmut]`` of pyproject.toml) copies ``src/`` to ``mutants/``,
writes every mutant of the modules named there into that copy behind a switch, and runs the
tests that reach each mutated function with that one mutant switched on. A mutant is *killed*
when some test fails, *survives* when they all pass.

This script runs mutmut one module at a time (so that a stop loses at most one module), then
reads mutmut's per-file results under ``mutants/`` and writes ``benchmarks/results/mutation.json``:
per module the number of mutants, killed, survived, timeouts and mutants no test reaches, the
score (killed + timeout over all mutants but skipped ones), and every surviving mutant with its
diff and the reviewed reason it is harmless, taken from ``benchmarks/mutation_reasons.json``.

    python benchmarks/mutation.py                          # every configured module
    python benchmarks/mutation.py accounting dp_sgd        # a subset (file stem, dotted or path)
    python benchmarks/mutation.py --report-only            # rewrite the JSON from mutants/
    python benchmarks/mutation.py --all accounting         # retest killed mutants too
    python benchmarks/mutation.py "driver:x_*sample*"      # only some functions of a module

Mutants already killed stay killed across runs (mutmut keeps its results in ``mutants/`` and
resets those of every function whose source changed); untested and surviving ones are tested
again, so that new tests count. Delete ``mutants/`` for a run from scratch.

A reason in ``mutation_reasons.json`` is keyed by ``module:function:hash``, the hash being that
of the mutant's diff without line numbers, so that it survives renumbering when other code of the
function changes; the key of every survivor is listed in the JSON.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "mutation.json"
REASONS = ROOT / "benchmarks" / "mutation_reasons.json"

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
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
    paths = []
    for src in cfg["source_paths"]:
        for path in sorted((ROOT / src).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if any(fnmatch.fnmatch(rel, pattern) for pattern in cfg["only_mutate"]):
                paths.append(rel)
    return paths


def dotted(path: str) -> str:
    """``src/fedguard/algorithms/privacy/accounting.py`` -> ``fedguard.algorithms.privacy.accounting``."""
    name = path.removesuffix(".py").replace("/", ".")
    return name.removeprefix("src.")


def select(names: list[str], modules: list[str]) -> list[str]:
    """The modules named; ``module:glob`` (``driver:x_*sample*``) keeps only the functions whose
    mangled name matches the glob."""
    if not names:
        return modules
    chosen = []
    for name in names:
        name, _, functions = name.partition(":")
        hits = [
            m for m in modules if name in (m, dotted(m), Path(m).stem) or dotted(m).endswith(name)
        ]
        if not hits:
            sys.exit(
                f"{name!r} is none of the configured modules: {[Path(m).stem for m in modules]}"
            )
        chosen += [f"{m}:{functions}" if functions else m for m in hits if m not in chosen]
    return chosen


def load_meta(module: str) -> dict[str, int | None] | None:
    meta = ROOT / "mutants" / f"{module}.meta"
    if not meta.exists():
        return None
    return json.loads(meta.read_text())["exit_code_by_key"]


def run_modules(modules: list[str], *, max_children: int, rerun_all: bool) -> float | None:
    """Test the mutants of ``modules`` in one mutmut run; the wall seconds, None if none pending.

    Killed mutants are kept unless ``rerun_all``; the rest (untested, surviving, untested by
    any test) are tested again."""
    targets: list[str] = []
    for entry in modules:
        module, _, functions = entry.partition(":")
        pattern = f"{dotted(module)}.{functions or '*'}"
        if not functions.endswith("*"):
            pattern += "*" if functions else ""
        codes = load_meta(module)
        if codes is None or rerun_all:
            targets.append(pattern)
            continue
        codes = {k: c for k, c in codes.items() if fnmatch.fnmatch(k, pattern)}
        pending = [k for k, c in codes.items() if STATUS.get(c, "suspicious") != "killed"]
        targets += pending if len(pending) < len(codes) else [pattern]
    if not targets:
        return None
    env = dict(os.environ)
    # Tests that start a child interpreter (the CLI, gRPC processes) import this checkout's
    # unmutated source rather than whatever an editable install points at; mutmut itself puts
    # mutants/src first on its own sys.path.
    # This file is also a pytest plugin (see pytest_collection_modifyitems below), loaded in
    # every pytest run mutmut makes: it puts the quickest tests first, which with mutmut's -x
    # ends a killed mutant's run at its first failing quick test.
    path = [str(ROOT / "src"), str(Path(__file__).resolve().parent), env.get("PYTHONPATH")]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, path))
    env["PYTEST_ADDOPTS"] = " ".join(filter(None, [env.get("PYTEST_ADDOPTS"), "-p", "mutation"]))
    exe = Path(sys.executable).with_name("mutmut")
    cmd = [str(exe) if exe.exists() else "mutmut", "run", "--max-children", str(max_children)]
    print(f"== {', '.join(modules)}: {len(targets)} mutants or globs", flush=True)
    start = time.perf_counter()
    proc = subprocess.run([*cmd, *targets], cwd=ROOT, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        print(f"mutmut run exited with {proc.returncode}", file=sys.stderr)
    return seconds


def diff_of(name: str, module: str) -> str:
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    cwd = os.getcwd()
    os.chdir(ROOT)  # mutmut reads pyproject.toml and mutants/ relative to the working directory
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


def report(modules: list[str], seconds: dict[str, float], elapsed: float | None, out: Path) -> dict:
    reasons = json.loads(REASONS.read_text()) if REASONS.exists() else {}
    old = json.loads(out.read_text()) if out.exists() else {}
    old_modules = old.get("modules", {})
    rows: dict[str, dict] = {}
    survivors = []
    total = dict.fromkeys(FIELDS, 0) | {"mutants": 0}
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
        row = {"mutants": len(codes)} | counts
        row["score"] = _score(row)
        if module in seconds:
            row["seconds"] = round(seconds[module], 1)
        elif "seconds" in old_modules.get(module, {}):
            row["seconds"] = old_modules[module]["seconds"]
        rows[module] = row
        for f in ("mutants", *FIELDS):
            total[f] += row[f]
    total["score"] = _score(total)
    total["seconds"] = round(sum(r.get("seconds", 0.0) for r in rows.values()), 1)
    explained = sum(1 for s in survivors if s["reason"])
    total["undetected_with_reason"] = explained
    total["score_counting_reviewed_survivors"] = _score(total, extra=explained)
    dirty = git("status", "--porcelain", "--", *modules, "tests")
    return {
        "tool": "mutmut",
        "version": importlib.metadata.version("mutmut"),
        "commit": git("rev-parse", "HEAD"),
        "uncommitted_changes_in_scope": bool(dirty),
        "score_definition": "(killed + timeout) / (mutants - skipped - not_checked); "
        "survived, no_tests and suspicious mutants are undetected and listed under survivors",
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
    parser.add_argument("modules", nargs="*", help="file stem, dotted name or path; default all")
    parser.add_argument("--max-children", type=int, default=2, help="parallel mutant workers")
    parser.add_argument("--all", action="store_true", help="retest killed mutants too")
    parser.add_argument("--together", action="store_true", help="one mutmut run for all")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the JSON")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    out: Path = args.out

    everything = configured_modules()
    chosen = select(args.modules, everything)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    if not args.report_only:
        # one module per mutmut run, so that a stop loses little and the time per module is
        # known; --together runs them in one, which saves mutmut's start (its clean run of
        # every selected test) per module
        groups = [chosen] if args.together else [[m] for m in chosen]
        for group in groups:
            took = run_modules(group, max_children=args.max_children, rerun_all=args.all)
            if took is not None:
                for entry in group:
                    module = entry.partition(":")[0]
                    seconds[module] = seconds.get(module, 0.0) + took / len(group)
            # write after every module, so that an interrupted run still leaves a report
            write(report(everything, seconds, time.perf_counter() - start, out), out)
    elapsed = None if args.report_only else time.perf_counter() - start
    result = report(everything, seconds, elapsed, out)
    write(result, out)
    t = result["total"]
    for module, row in result["modules"].items():
        print(
            f"{module:48s} {row['mutants']:5d} mutants  {row['killed'] + row['timeout']:5d} killed  "
            f"{row['survived'] + row['no_tests'] + row['suspicious']:4d} undetected  "
            f"score {row['score']}"
        )
    print(
        f"total: {t['mutants']} mutants, score {t['score']}, "
        f"{len(result['survivors'])} undetected ({t['undetected_with_reason']} with a reason)"
    )


if __name__ == "__main__":
    main()
