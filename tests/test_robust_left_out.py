"""Which clients a robust rule left out of a round: the rules' selections, their trip through the
strategy to client ids, and a run whose outlier shows up as left out in its metrics and status."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import metric_rows, ten_iid_config
from fedguard.algorithms import robust
from fedguard.algorithms.optimizers import server as server_optimizers
from fedguard.algorithms.robust import bucketing as robust_bucketing
from fedguard.algorithms.robust import coordinate as robust_coordinate
from fedguard.algorithms.robust import distance as robust_distance
from fedguard.algorithms.seeding import generator
from fedguard.experiment import config as config_mod
from fedguard.experiment import runner
from fedguard.observe import report
from fedguard.protocol import messages, robust_rules
from fedguard.protocol.aggregator import Aggregator, Condition, LeftOut, RuleReport
from fedguard.protocol.fedopt import FedOpt
from fedguard.protocol.shared_part import SharedPart

K, D, OUTLIER = 7, 4, 5  # seven updates, row 5 far from the others


def _updates() -> torch.Tensor:
    rows = torch.randn(K, D, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    rows[OUTLIER] += 100.0
    return rows


def _select(kind: robust.RobustAggregator, **kw) -> tuple[torch.Tensor, robust.Selection]:
    cfg = robust.RobustConfig(kind, f=1, norm_bound=1.0, **kw)
    updates = _updates()
    state = robust.init(cfg, D)
    _, out, selection = robust.apply_selecting(cfg, state, updates, torch.ones(K), round_=2)
    # the selecting path aggregates exactly as the plain one
    assert torch.equal(out, robust.apply(cfg, state, updates, torch.ones(K), round_=2)[1])
    return out, selection


def test_krum_leaves_out_every_update_but_the_one_it_returns() -> None:
    out, selection = _select(robust.RobustAggregator.KRUM)
    kept = [r for r in range(K) if r not in selection.excluded]
    assert selection.selects and len(kept) == 1 and kept[0] != OUTLIER
    assert OUTLIER in selection.excluded and len(selection.excluded) == K - 1
    assert torch.equal(out, _updates()[kept[0]])
    assert selection.trimmed is None


def test_multi_krum_leaves_out_exactly_the_outlier() -> None:
    out, selection = _select(robust.RobustAggregator.MULTI_KRUM)  # m = K - f = 6
    assert selection == robust.Selection(selects=True, excluded=(OUTLIER,), trimmed=None)
    honest = torch.cat([_updates()[:OUTLIER], _updates()[OUTLIER + 1 :]])
    assert torch.allclose(out, honest.mean(dim=0))


def test_bulyan_leaves_out_the_2f_rows_its_repeated_krum_did_not_pick() -> None:
    updates = _updates()
    _, picked = robust_distance.bulyan_selecting(updates, f=1)
    assert len(picked) == K - 2 and OUTLIER not in picked
    _, selection = _select(robust.RobustAggregator.BULYAN)
    assert selection.selects and OUTLIER in selection.excluded
    assert selection.excluded == tuple(sorted(set(range(K)) - set(picked)))


def test_trimmed_mean_reports_the_share_of_each_rows_coordinates_it_cut() -> None:
    # by hand, f = 1: column 0 keeps 1 and 2 (cuts row 0's 0 and row 3's 100), column 1 keeps
    # 0 and 1 (cuts row 3's -5 and row 2's 10)
    updates = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 10.0], [100.0, -5.0]])
    out, share = robust_coordinate.trimmed_mean_reporting(updates, f=1)
    assert out.tolist() == [1.5, 0.5]
    assert share.tolist() == [0.5, 0.0, 0.5, 1.0]
    # a value equal to a cut value counts as kept
    tied = torch.tensor([[1.0], [1.0], [1.0], [1.0]])
    assert robust_coordinate.trimmed_mean_reporting(tied, f=1)[1].tolist() == [0.0] * 4
    _, selection = _select(robust.RobustAggregator.TRIMMED_MEAN)
    assert not selection.selects and selection.excluded == ()
    assert selection.trimmed is not None and selection.trimmed[OUTLIER] == 1.0
    assert sum(selection.trimmed) == pytest.approx(2.0)  # 2f values cut per coordinate


@pytest.mark.parametrize(
    "kind",
    [
        robust.RobustAggregator.MEDIAN,
        robust.RobustAggregator.GEOMETRIC_MEDIAN,
        robust.RobustAggregator.CENTERED_CLIPPING,
        robust.RobustAggregator.NORM_BOUNDING,
    ],
)
def test_rules_that_pick_no_whole_update_say_so(kind: robust.RobustAggregator) -> None:
    _, selection = _select(kind)
    assert selection == robust.Selection(selects=False, excluded=(), trimmed=None)


def test_on_buckets_every_row_of_a_bucket_left_out_is_left_out() -> None:
    cfg = robust.RobustConfig(robust.RobustAggregator.KRUM, f=1, bucket_size=2)
    updates = torch.randn(12, D, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    updates[OUTLIER] += 100.0
    _, out, selection = robust.apply_selecting(
        cfg, robust.init(cfg, D), updates, torch.ones(12), round_=4
    )
    members = robust_bucketing.bucket_members(12, 2, generator(cfg.seed, 4, robust.BUCKET_STREAM))
    assert sorted(r for rows in members for r in rows) == list(range(12))
    kept = [rows for rows in members if not set(rows) & set(selection.excluded)]
    assert len(kept) == 1 and len(selection.excluded) == 10  # Krum keeps one bucket mean
    assert OUTLIER in selection.excluded and OUTLIER not in kept[0]
    assert torch.allclose(out, updates[kept[0]].mean(dim=0))  # that bucket's mean


def _replies(updates: torch.Tensor, ids: list[int]) -> list[messages.FitReply]:
    return [
        messages.FitReply(1, cid, row.float(), 10, {"train_loss": 0.5})
        for cid, row in zip(ids, updates, strict=True)
    ]


def test_the_strategy_names_the_clients_the_rule_left_out() -> None:
    ids = [30, 31, 32, 33, 34, 35, 36]
    rule = robust_rules.RobustRule(robust.RobustConfig(robust.RobustAggregator.MULTI_KRUM, f=1))
    fedavg = server_optimizers.ServerOptimizerConfig(server_optimizers.ServerOptimizer.FEDAVG)
    strategy = FedOpt(fedavg, {}, aggregator=rule)
    params = torch.zeros(D)
    state = strategy.init(params)
    _, new, left_out = strategy.aggregate_reporting(state, params, _replies(_updates(), ids))
    assert left_out == LeftOut("multi_krum", True, tuple(ids), (OUTLIER,), None)
    assert left_out.clients == (35,)
    assert left_out.metrics() == {
        "robust_rule": "multi_krum",
        "clients_left_out": 1,
        "left_out_clients": [35],
        "trimmed_share": None,
    }
    assert torch.equal(new, strategy.aggregate(state, params, _replies(_updates(), ids))[1])


class _DropFirst(Aggregator):
    """A plug-in rule that leaves out its first update and averages the rest."""

    name = "drop_first"

    def condition(self, n: int, f: int) -> Condition:
        return Condition(n >= 2, "K >= 2")

    def aggregate(self, updates, weights, *, state, context):
        return self.aggregate_reporting(updates, weights, state=state, context=context)[:2]

    def aggregate_reporting(self, updates, weights, *, state, context):
        return state, updates[1:].mean(dim=0), RuleReport(self.name, True, (0,))


def test_a_plug_in_rules_report_reaches_the_strategys_left_out() -> None:
    fedavg = server_optimizers.ServerOptimizerConfig(server_optimizers.ServerOptimizer.FEDAVG)
    strategy = FedOpt(fedavg, {}, aggregator=_DropFirst())
    params = torch.zeros(D)
    updates = torch.arange(12, dtype=torch.float32).reshape(3, D)
    _, new, left_out = strategy.aggregate_reporting(
        strategy.init(params), params, _replies(updates, [9, 4, 6])
    )
    assert left_out is not None and left_out.clients == (9,) and left_out.rule == "drop_first"
    assert new.tolist() == [6.0, 7.0, 8.0, 9.0]  # the mean of the last two rows
    # an aggregator that says nothing (the mean) leaves the report out
    plain = FedOpt(fedavg, {})
    assert (
        plain.aggregate_reporting(plain.init(params), params, _replies(updates, [9, 4, 6]))[2]
        is None
    )


def test_a_report_by_client_averages_a_clients_two_replies_and_keeps_each_verdict() -> None:
    report = RuleReport("trimmed_mean", False, (), (0.25, 0.5, 0.75))
    left_out = report.by_client([8, 3, 8])  # client 8 twice in one asynchronous buffer
    assert left_out.trimmed_by_client() == {8: 0.5, 3: 0.5}
    assert left_out.row_verdicts() == [(False, 0.25), (False, 0.5), (False, 0.75)]
    assert left_out.metrics()["clients_left_out"] is None  # it picks no whole update
    picked = RuleReport("krum", True, (0, 2)).by_client([8, 3, 8])
    assert picked.clients == (8, 8) and picked.row_verdicts()[1] == (False, None)


def _outlier_run(tmp_path, aggregator: str) -> tuple[list[dict], dict, int]:
    cfg = config_mod.validate(
        ten_iid_config(
            aggregator,
            experiment={"rounds": 2},
            server={"aggregator": aggregator, "byzantine_f": 1},
            attack={"kind": "boost", "fraction": 0.1, "factor": 50.0},
        )
    )
    summary = runner.run(cfg, out=tmp_path / aggregator, progress=False)
    (outlier,) = summary["attack"]["malicious"]
    status = json.loads((tmp_path / aggregator / "status.json").read_text())
    return metric_rows(tmp_path / aggregator), status, outlier


def test_a_run_under_multi_krum_shows_the_boosting_client_left_out(tmp_path) -> None:
    rows, status, outlier = _outlier_run(tmp_path, "multi_krum")
    for row in rows:  # every round: exactly the attacker
        assert row["robust_rule"] == "multi_krum"
        assert row["left_out_clients"] == [outlier] and row["clients_left_out"] == 1
    last = status["current"]
    assert last["robust_rule"] == "multi_krum" and last["left_out_clients"] == [outlier]
    verdicts = {c["client"]: c["left_out_by"] for c in last["clients"]}
    assert verdicts == {c: ("multi_krum" if c == outlier else None) for c in range(10)}
    assert {c["status"] for c in last["clients"]} == {"replied"}
    html = report.build_report(tmp_path / "multi_krum")
    table = html[html.index("what the robust rule did to each client") :]
    assert f"<tr><td>{outlier}</td><td>multi_krum</td><td>2</td><td>1, 2</td>" in table


def test_a_run_under_the_trimmed_mean_shows_the_share_cut_of_each_client(tmp_path) -> None:
    rows, status, outlier = _outlier_run(tmp_path, "trimmed_mean")
    shares = {int(c): s for c, s in rows[-1]["trimmed_share"].items()}
    assert rows[-1]["left_out_clients"] == [] and rows[-1]["clients_left_out"] is None
    assert shares[outlier] == 1.0  # every coordinate of the boosted update is cut
    assert max(s for c, s in shares.items() if c != outlier) < 0.5
    assert sum(shares.values()) == pytest.approx(2.0, abs=1e-4)  # 2f values per coordinate
    table = {c["client"]: c for c in status["current"]["clients"]}
    assert table[outlier]["trimmed_share"] == 1.0 and table[outlier]["left_out_by"] is None


def test_fedper_keeps_the_rules_report_of_the_bodies_it_aggregates() -> None:
    """Under FedRep/FedPer (only the body aggregated) the rule still names the client it left
    out: here the outlier differs only in the body (positions 0-1), the head (2-3) is masked."""
    ids = [30, 31, 32, 33, 34, 35, 36]
    rule = robust_rules.RobustRule(robust.RobustConfig(robust.RobustAggregator.MULTI_KRUM, f=1))
    fedavg = server_optimizers.ServerOptimizerConfig(server_optimizers.ServerOptimizer.FEDAVG)
    head = torch.tensor([False, False, True, True])
    strategy = SharedPart(FedOpt(fedavg, {}, aggregator=rule), head)
    updates = _updates()
    updates[2, 2:] += 500.0  # a wild head on client 32: masked, so not an outlier
    params = torch.full((D,), 0.25)
    _, new, left_out = strategy.aggregate_reporting(
        strategy.init(params), params, _replies(updates, ids)
    )
    assert left_out is not None and left_out.clients == (35,)
    honest = torch.cat([updates[:OUTLIER], updates[OUTLIER + 1 :]]).mean(dim=0)
    assert torch.allclose(new[:2], params[:2] + honest[:2].float(), atol=1e-6)
    assert torch.equal(new[2:], params[2:])  # the head is kept
