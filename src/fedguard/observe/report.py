"""``fedguard report``: one self-contained HTML file of a run folder.

The file inlines everything it shows: the plotly.js of the ``plotly`` package, the charts' data,
the tables; it opens offline, can be mailed or archived with the run. Sections: configuration,
partition, learning curves, final metrics with the confusion matrix, privacy (mechanism, epsilon
per round and the inputs anyone needs to recompute it with dp-accounting, from
``summary.json``), secure-aggregation and robustness settings with what the robust rule did to
each client (left out, or a share of its coordinates trimmed; from metrics.jsonl), failures and
rejections by client (from ``run.log``, which has every round's, across resumes), contribution
scores, audit results. A section whose file is missing says so; a run still being written is reported as far
as it got.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedguard.observe import runview

RUN_LOG = "run.log"
# The round driver's log lines for a client it did not use (fedguard.protocol.driver).
_PROBLEM = re.compile(
    r"round (?P<round>\d+): client (?P<client>\d+) (?:failed \((?P<kind>\w+)\)|(?P<rejected>rejected)): (?P<reason>.*)"
)
COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2"]

STYLE = """
body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1100px; padding: 16px; color: #1d2330; }
h1 { font-size: 22px; } h2 { font-size: 17px; border-bottom: 1px solid #d8dce3; padding-bottom: 3px; margin-top: 26px; }
table { border-collapse: collapse; font-size: 13px; margin: 6px 0; }
td, th { border: 1px solid #e1e4ea; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f3f4f6; }
.chart { height: 320px; } .row { display: grid; grid-template-columns: 1fr 1fr; gap: 10px; }
.note { color: #6b7280; font-size: 13px; } .bad { color: #b91c1c; }
code { font-size: 12px; } h3 { font-size: 13px; margin: 8px 0 2px 0; }
.config { display: flex; flex-wrap: wrap; gap: 4px 14px; align-items: flex-start; }
.config table { font-size: 11px; } .config td, .config th { padding: 1px 5px; }
"""


def problems_by_client(log_text: str) -> dict[int, list[dict[str, Any]]]:
    """Every failure and rejection in a run.log, by client: ``{"round", "kind", "reason"}``."""
    out: dict[int, list[dict[str, Any]]] = {}
    for line in log_text.splitlines():
        m = _PROBLEM.search(line)
        if m is None:
            continue
        kind = "rejected" if m["rejected"] else f"failed ({m['kind']})"
        out.setdefault(int(m["client"]), []).append(
            {"round": int(m["round"]), "kind": kind, "reason": m["reason"].strip()}
        )
    return out


def left_out_by_client(rows: Sequence[Mapping[str, Any]]) -> dict[int, dict[str, Any]]:
    """What the robust rule did to each client over the rounds of metrics.jsonl: ``{"rule",
    "rounds"}`` (the rounds its update was left out of the aggregate) and, for a trimming rule,
    ``"trimmed"`` (the mean share of its coordinates cut over the rounds it was in)."""
    out: dict[int, dict[str, Any]] = {}
    shares: dict[int, list[float]] = {}
    for row in rows:
        rule = row.get("robust_rule")
        if not rule:
            continue
        for cid in row.get("left_out_clients") or []:
            entry = out.setdefault(int(cid), {"rule": rule, "rounds": [], "trimmed": None})
            entry["rounds"].append(int(row["round"]))
        for cid, share in (row.get("trimmed_share") or {}).items():
            if isinstance(share, int | float):
                shares.setdefault(int(cid), []).append(float(share))
                out.setdefault(int(cid), {"rule": rule, "rounds": [], "trimmed": None})
    for cid, values in shares.items():
        out[cid]["trimmed"] = sum(values) / len(values)
    return out


def _e(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return html.escape(f"{value:.6g}")
    return html.escape(str(value))


def _table(rows: Iterable[Sequence[Any]], header: Sequence[str] | None = None) -> str:
    head = "" if header is None else "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>"
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _kv(mapping: Mapping[str, Any]) -> str:
    rows = []
    for key, value in mapping.items():
        if isinstance(value, dict | list):
            value = json.dumps(value)
        rows.append((key, value))
    return _table(rows)


class _Charts:
    """The report's charts as plotly.js calls (data inlined as JSON)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def chart(self, traces: list[dict[str, Any]], layout: dict[str, Any]) -> str:
        div = f"chart-{len(self.calls)}"
        spec = json.dumps({"data": traces, "layout": layout}, allow_nan=False)
        spec = spec.replace("</", "<\\/")  # never ends the script element
        self.calls.append(
            f"Plotly.newPlot({json.dumps(div)}, ...(s => [s.data, s.layout])({spec}), "
            "{displayModeBar: false, staticPlot: false});"
        )
        return f'<div class="chart" id="{div}"></div>'


def _curve(rows: list[dict[str, Any]], key: str, name: str, color: str, dash: str = "solid"):
    points = [
        r for r in rows if isinstance(r.get(key), int | float) and not isinstance(r.get(key), bool)
    ]
    return {
        "x": [r["round"] for r in points],
        "y": [r[key] for r in points],
        "type": "scatter",
        "mode": "lines+markers",
        "name": name,
        "line": {"color": color, "dash": dash},
    }


def _layout(title: str, ytitle: str, **extra: Any) -> dict[str, Any]:
    base = {
        "title": {"text": title, "font": {"size": 14}},
        "margin": {"l": 55, "r": 10, "t": 35, "b": 45},
        "xaxis": {"title": {"text": "round"}, "tickformat": "d"},
        "yaxis": {"title": {"text": ytitle}},
    }
    base.update(extra)
    return base


def build_report(run_dir: Path) -> str:
    """The report of the run at ``run_dir`` as one HTML document."""
    from plotly.offline import get_plotlyjs  # type: ignore[import-untyped]

    run = runview.RunReader().read(run_dir)
    rows: list[dict[str, Any]] = run["metrics"]
    summary: dict[str, Any] = run.get("summary") or {}
    config: dict[str, Any] = run.get("config") or {}
    status: dict[str, Any] = run.get("status") or {}
    charts = _Charts()
    parts: list[str] = []
    state = summary.get("status") or status.get("state") or "no summary yet (running?)"
    parts.append(f"<h1>fedguard report: {_e(run['name'])}</h1>")
    parts.append(
        _table(
            [
                ("run folder", run["path"]),
                ("state", state),
                (
                    "rounds",
                    f"{summary.get('rounds_completed', len(rows))} of "
                    f"{summary.get('rounds_planned', status.get('rounds_planned'))}",
                ),
                ("seconds", summary.get("seconds")),
                (
                    "versions",
                    json.dumps(summary.get("versions")) if summary.get("versions") else None,
                ),
            ]
        )
    )
    if summary.get("error"):
        parts.append(f'<p class="bad">{_e(summary["error"])}</p>')
    if run["problems"]:
        parts.append("".join(f'<p class="bad">{_e(p)}</p>' for p in run["problems"]))

    parts.append("<h2>Configuration</h2>")
    if config:
        boxes = [
            f"<div><h3>[{_e(section)}]</h3>{_kv(values)}</div>"
            for section, values in config.items()
            if isinstance(values, dict)
        ]
        parts.append('<div class="config">' + "".join(boxes) + "</div>")
    else:
        parts.append('<p class="note">no config.toml</p>')

    parts.append("<h2>Partition</h2>")
    partition = run.get("partition") or {}
    clients = partition.get("clients") or []
    if clients:
        names = partition.get("class_names") or []
        traces = [
            {
                "x": [str(c.get("id")) for c in clients],
                "y": [(c.get("label_counts") or [0] * len(names))[k] for c in clients],
                "type": "bar",
                "name": f"class {name}",
            }
            for k, name in enumerate(names)
        ]
        parts.append(
            charts.chart(
                traces,
                _layout(
                    "examples per client and class",
                    "examples",
                    barmode="stack",
                    xaxis={"title": {"text": "client"}, "type": "category"},
                ),
            )
        )
    else:
        parts.append('<p class="note">no partition.json</p>')

    parts.append("<h2>Learning curves</h2>")
    if rows:
        parts.append('<div class="row">')
        parts.append(
            charts.chart(
                [_curve(rows, "test_accuracy", "test accuracy", COLORS[0])],
                _layout("test accuracy", "accuracy"),
            )
        )
        parts.append(
            charts.chart(
                [
                    _curve(rows, "test_loss", "test loss", COLORS[0]),
                    _curve(rows, "train_loss", "train loss", COLORS[1], "dot"),
                ],
                _layout("loss", "loss"),
            )
        )
        if any(r.get("test_auc") is not None for r in rows):
            parts.append(
                charts.chart(
                    [_curve(rows, "test_auc", "test AUC", COLORS[2])], _layout("test AUC", "AUC")
                )
            )
        parts.append(
            charts.chart(
                [
                    _curve(rows, "bytes_up", "bytes up", COLORS[3]),
                    _curve(rows, "bytes_down", "bytes down", COLORS[4], "dot"),
                ],
                _layout("bytes per round", "bytes"),
            )
        )
        parts.append("</div>")
    else:
        parts.append('<p class="note">no metrics rows yet</p>')

    parts.append("<h2>Final metrics</h2>")
    finals: dict[str, Any] = {
        k: summary.get(k)
        for k in (
            "final_round_evaluated",
            "test_accuracy",
            "test_loss",
            "test_auc",
            "backdoor_success",
            "evaluation_split",
            "evaluation_mode",
            "num_clients",
            "num_parameters",
            "clients_failed",
            "clients_rejected",
            "rounds_aborted",
        )
        if k in summary
    }
    parts.append(_kv(finals) if finals else '<p class="note">no summary.json yet</p>')
    matrix = summary.get("confusion_matrix")
    if isinstance(matrix, list) and matrix:
        labels = [str(n) for n in (partition.get("class_names") or range(len(matrix)))]
        parts.append(
            charts.chart(
                [
                    {
                        "z": matrix,
                        "x": labels,
                        "y": labels,
                        "type": "heatmap",
                        "colorscale": "Blues",
                        "texttemplate": "%{z}",
                        "showscale": False,
                    }
                ],
                _layout(
                    "confusion matrix (rows: true class, columns: predicted)",
                    "true class",
                    xaxis={"title": {"text": "predicted class"}, "type": "category"},
                    yaxis={
                        "title": {"text": "true class"},
                        "type": "category",
                        "autorange": "reversed",
                    },
                ),
            )
        )
        parts.append(
            _table([[labels[i], *r] for i, r in enumerate(matrix)], ["true \\ predicted", *labels])
        )

    parts.append("<h2>Privacy</h2>")
    privacy_cfg = config.get("privacy") or {}
    parts.append(_kv(privacy_cfg) if privacy_cfg else '<p class="note">no [privacy] table</p>')
    if summary.get("epsilon") is not None:
        parts.append(
            f"<p>epsilon <b>{_e(summary['epsilon'])}</b> at delta {_e(summary.get('delta'))}</p>"
        )
    if any(r.get("epsilon") is not None for r in rows):
        parts.append(
            charts.chart(
                [_curve(rows, "epsilon", "epsilon", COLORS[4])],
                _layout("epsilon spent after each round", "epsilon"),
            )
        )
    if isinstance(summary.get("privacy"), dict):
        parts.append("<h3>Inputs to recompute epsilon (dp-accounting)</h3>")
        parts.append(_kv(summary["privacy"]))
    elif not privacy_cfg or privacy_cfg.get("mode", "off") == "off":
        parts.append('<p class="note">no differential privacy in this run</p>')

    parts.append("<h2>Secure aggregation and robustness</h2>")
    secagg = config.get("secure_aggregation") or {}
    parts.append(
        "<h3>secure aggregation</h3>" + (_kv(secagg) if secagg else '<p class="note">off</p>')
    )
    server = config.get("server") or {}
    robust = {
        k: v
        for k, v in server.items()
        if k
        in ("aggregator", "byzantine_f", "bucket_size", "max_norm", "trim_fraction", "strategy")
    }
    robust.update({k: summary[k] for k in ("aggregator", "byzantine_f", "attack") if k in summary})
    parts.append("<h3>robust aggregation</h3>" + _kv(robust))
    if config.get("attack"):
        parts.append("<h3>simulated attack</h3>" + _kv(config["attack"]))
    verdicts = left_out_by_client(rows)
    if verdicts:
        parts.append("<h3>what the robust rule did to each client</h3>")
        parts.append(
            _table(
                [
                    (
                        cid,
                        v["rule"],
                        len(v["rounds"]),
                        ", ".join(str(r) for r in v["rounds"]) or "–",
                        "–" if v["trimmed"] is None else f"{100 * v['trimmed']:.1f}%",
                    )
                    for cid, v in sorted(verdicts.items())
                ],
                ["client", "rule", "rounds left out", "which rounds", "coordinates trimmed (mean)"],
            )
        )
    elif any(r.get("robust_rule") for r in rows):
        parts.append('<p class="note">the robust rule left no client out</p>')
    refused = [(r["round"], r["aggregate_rejected"]) for r in rows if r.get("aggregate_rejected")]
    if refused:
        parts.append(
            "<h3>rounds whose aggregate was refused</h3>" + _table(refused, ["round", "reason"])
        )

    parts.append("<h2>Failures and rejections by client</h2>")
    log_path = Path(run_dir) / RUN_LOG
    by_client = (
        problems_by_client(log_path.read_text(errors="replace")) if log_path.exists() else {}
    )
    if by_client:
        table = []
        for cid in sorted(by_client):
            events = by_client[cid]
            failed = sum(e["kind"].startswith("failed") for e in events)
            rejected = len(events) - failed
            last = events[-1]
            table.append(
                (
                    cid,
                    failed,
                    rejected,
                    ", ".join(str(e["round"]) for e in events),
                    f"round {last['round']}: {last['kind']}: {last['reason']}",
                )
            )
        parts.append(_table(table, ["client", "failed", "rejected", "rounds", "last reason"]))
    else:
        parts.append(
            '<p class="note">no client failed or was rejected'
            + ("" if log_path.exists() else " (no run.log)")
            + "</p>"
        )

    parts.append("<h2>Contribution scores</h2>")
    contributions = run.get("contributions") or {}
    cumulative = contributions.get("cumulative") or {}
    if cumulative:
        ids = list(cumulative)
        parts.append(
            charts.chart(
                [
                    {
                        "x": [f"client {c}" for c in ids],
                        "y": [cumulative[c] for c in ids],
                        "type": "bar",
                        "marker": {"color": COLORS[2]},
                    }
                ],
                _layout(
                    f"cumulative scores ({contributions.get('method')})",
                    "score",
                    xaxis={"type": "category"},
                ),
            )
        )
        detail = summary.get("contribution") or {}
        if detail:
            parts.append(
                _kv(
                    {
                        k: detail[k]
                        for k in ("method", "flagged", "excluded", "rewards")
                        if k in detail
                    }
                )
            )
    else:
        parts.append('<p class="note">no contribution scores ([contribution] off)</p>')

    parts.append("<h2>Audit</h2>")
    audit = run.get("audit") or {}
    audit_rows = audit.get("rows") or []
    if audit_rows:
        keys = sorted({k for r in audit_rows for k in r if not isinstance(r[k], dict | list)})
        parts.append(_table([[r.get(k) for k in keys] for r in audit_rows], keys))
    else:
        parts.append('<p class="note">no audit results (run `fedguard audit RUN_DIR`)</p>')

    script = get_plotlyjs()
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>fedguard report: {_e(run['name'])}</title><style>{STYLE}</style>"
        f"<script>{script}</script></head><body>"
        + "\n".join(parts)
        + "<script>\n"
        + "\n".join(charts.calls)
        + "\nwindow.fedguardReportReady = true;\n</script>"
        "</body></html>\n"
    )


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write :func:`build_report`'s HTML to ``out`` (default RUN_DIR/report.html)."""
    path = Path(out) if out is not None else Path(run_dir) / "report.html"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(build_report(Path(run_dir)), encoding="utf-8")
    tmp.replace(path)
    return path
