"""Gradient inversion of a client's update (Geiping et al. 2020) re-created from a run: an
unprotected one-image update gives its image back; DP-SGD at epsilon 1 leaves the attacker no
better than random images; under secure aggregation the attacker works on the sum."""

from __future__ import annotations

import math

import matplotlib.image
import pytest
import torch

import fedguard
from conftest import tiny_config
from fedguard.audit import canary, inversion
from fedguard.audit import runner as audit_runner

ITERATIONS = 300


def _audit(
    tmp_path, name: str, shape: tuple[int, ...] = (1, 8, 8), batch_size: int = 1, **sections
) -> dict:
    """A one-round logistic-regression run on synthetic records of ``shape`` (8x8 images),
    then the inversion of client 0's one-step update of ``batch_size`` records in round 1."""
    cfg = tiny_config(
        experiment={"rounds": 1, "seed": 4},
        data={"num_clients": 4, "synthetic_samples": 200, "synthetic_shape": list(shape)},
        client={"epochs": 1, "batch_size": 16, "lr": 0.1, "max_steps": 2},
        **sections,
    )
    out = tmp_path / name
    fedguard.run(cfg, out=out, progress=False)
    settings = inversion.InversionSettings(client=0, batch_size=batch_size, iterations=ITERATIONS)
    report = audit_runner.audit(
        out, ["inversion"], options=audit_runner.AuditOptions(inversion=settings)
    )
    return report.rows[0]


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> dict:
    """The inversion row of the run without protection (shared by two tests)."""
    return _audit(tmp_path_factory.mktemp("plain"), "plain", server={"clients_per_round": 4})


def test_unprotected_one_image_update_gives_the_image_back(plain):
    row = plain
    assert row["observed"] == "the update" and row["labels_recovered"]
    assert row["batch_size"] == 1 and row["local_steps"] == 1
    assert row["gradient_cosine"] > 0.99
    assert row["psnr"] > 30.0  # about 60 dB measured: a linear layer's gradient holds the image
    assert row["psnr"] > row["mean_image_psnr"] + 20.0
    assert row["ssim"] > 0.9
    assert row["baseline_psnr"] < 12.0
    assert row["run"].endswith("plain")


def test_dp_sgd_at_epsilon_one_leaves_only_the_random_baseline(tmp_path):
    # the noise multiplier at which the attacked update itself (one full-batch step) is
    # (1, 1e-5)-DP: accounting.calibrate_noise of the PLD epsilon of that step gives 3.7323
    z = 3.7323
    row = _audit(
        tmp_path,
        "dp",
        server={"clients_per_round": 4},
        privacy={"mode": "local", "noise_multiplier": z, "max_grad_norm": 1.0},
    )
    assert row["protection"] == "local"
    assert row["update_epsilon"] == pytest.approx(1.0, abs=0.01)
    # Measured: 13.1 dB against 10.0 dB for uniformly random images and 18.5 dB for the mean
    # image of the other clients (synthetic records sit in the middle of their range, where a
    # smooth guess scores above uniform noise): the update tells the attacker less than the
    # population's mean image does.
    assert row["psnr"] < row["baseline_psnr"] + 4.0
    assert row["psnr"] < row["mean_image_psnr"] - 3.0


@pytest.mark.plots  # its pictures are drawn (conftest)
def test_under_secure_aggregation_the_attacker_has_only_the_sum(tmp_path, plain):
    row = _audit(
        tmp_path,
        "secagg",
        server={"clients_per_round": 4},
        secure_aggregation={"enabled": True, "clip_norm": 100.0},
    )
    assert row["protection"] == "secagg" and row["observed"] == "the sum of 4 updates"
    assert row["psnr"] < plain["psnr"] - 20.0
    assert (tmp_path / "secagg" / "audit" / "inversion.png").stat().st_size > 5_000


@pytest.mark.plots  # its pictures are drawn (conftest)
def test_a_wide_feature_map_is_inverted_scored_and_drawn_in_low_rows(tmp_path):
    # records 4 high and 12 wide, like a spectrogram's mel bands by frames (speech: 40 x 101)
    row = _audit(tmp_path, "wide", shape=(1, 4, 12), batch_size=4, server={"clients_per_round": 4})
    assert row["batch_size"] == 4 and len(row["psnr_each"]) == 4
    assert all(math.isfinite(v) for v in [*row["psnr_each"], *row["ssim_each"]])
    assert row["psnr"] > row["baseline_psnr"]
    picture = matplotlib.image.imread(tmp_path / "wide" / "audit" / "inversion.png")
    # 4 columns 1.2 inches wide and rows a third of that tall, at least 0.5 inches: 0.8 + 2 * 0.5
    # inches at 120 dpi (square records get 0.8 + 2 * 1.2)
    assert picture.shape[1] == pytest.approx((4 * 1.2 + 0.6) * 120, abs=1)
    assert picture.shape[0] == pytest.approx(1.8 * 120, abs=1)


def test_user_level_canary_clients_stay_out_of_the_mean_image(tmp_path, plain):
    # canary clients hold stand-in copies of one real record (the first client's first, the
    # attacked one here): were they counted, the mean image would be that record
    canaries = 20
    everyone = 4 + canary.included_count(canaries, 4)
    row = _audit(
        tmp_path,
        "user_canaries",
        server={"clients_per_round": everyone},
        audit={"canaries": canaries, "canary_level": "user"},
    )
    assert row["mean_image_psnr"] == pytest.approx(plain["mean_image_psnr"])


def test_labels_of_one_record_come_from_the_output_bias():
    from fedguard.models import registry

    model = registry.build(
        "logistic_regression", framework="torch", input_shape=(1, 4, 4), num_classes=3, seed=0
    )
    update = torch.zeros(model.spec.size)
    bias = model.trainable()[-1]
    update[bias.offset + 2] = 0.5  # the bias of class 2 grew: the record's label
    update[bias.offset] = -0.3
    assert inversion.recover_labels(model, update, 1, 3).tolist() == [2]
    update[bias.offset] = 0.5  # two classes grew equally: four records dealt two and two
    assert sorted(inversion.recover_labels(model, update, 4, 3).tolist()) == [0, 0, 2, 2]


def test_psnr_of_identical_images_is_capped_by_the_assignment_and_baseline_is_low():
    x = torch.rand(3, 1, 8, 8)
    scored = inversion.score(x, x.flip(0), (0.0, 1.0))
    assert scored["order"] == [2, 1, 0]  # each reconstruction matched to its own original
    assert scored["ssim"] == pytest.approx(1.0)
    assert scored["baseline_psnr"] < 10.0
