"""The open-set rule (pictor.core.open_set): class Gaussians, thresholds and their calibration."""

from __future__ import annotations

import numpy as np
import pytest

from pictor.core.open_set import ClassGaussians, OpenSetThresholds, budget_threshold, calibrate_thresholds
from pictor.errors import InvalidRequestError


def test_is_unknown_needs_both_scores_below() -> None:
    t = OpenSetThresholds(class_fit=-5.0, neighbor_similarity=0.5)
    assert t.is_unknown(-9.0, 0.2)
    assert not t.is_unknown(-1.0, 0.2)  # fits a class: keeps the label
    assert not t.is_unknown(-9.0, 0.9)  # close neighbour keeps the label
    assert t.is_unknown([-9.0, -1.0], [0.2, 0.2]).tolist() == [True, False]
    assert OpenSetThresholds.from_dict(t.to_dict()) == t


def test_far_neighbour_alone_makes_unknown_and_nan_leaves_it_to_the_class_fit() -> None:
    t = OpenSetThresholds(class_fit=-5.0, neighbor_similarity=0.5, far_similarity=0.3,
                          class_fit_alone=-8.0)
    assert t.is_unknown(-1.0, 0.1)  # fits a class, but nothing indexed is anywhere near
    assert not t.is_unknown(-1.0, 0.4)
    # NaN: no comparable neighbour (whitened index, none of the model's classes): the class
    # fit decides alone, against its own threshold.
    assert t.is_unknown([-9.0, -6.0, -1.0], [np.nan] * 3).tolist() == [True, False, False]
    assert OpenSetThresholds.from_dict(t.to_dict()) == t
    assert t.describe() == ("unknown when class fit < -5.000 and nearest neighbour similarity < "
                            "0.500, or nearest neighbour similarity < 0.300; without comparable "
                            "neighbours, when class fit < -8.000")
    older = {"class_fit": -5.0, "neighbor_similarity": 0.5}  # files before the far test
    old = OpenSetThresholds.from_dict(older)
    assert old.far_similarity == old.class_fit_alone == -np.inf
    assert not old.is_unknown(-1.0, 0.0) and not old.is_unknown(-9.0, np.nan)
    assert old.describe() == ("unknown when class fit < -5.000 and nearest neighbour "
                              "similarity < 0.500")
    # Without comparable neighbours in the index (Info says so): the rule that applies then.
    assert t.describe(neighbours=False) == "unknown when class fit < -8.000"
    assert old.describe(neighbours=False) == "never unknown"


def test_why_unknown_names_the_test_that_decided_and_agrees_with_is_unknown() -> None:
    t = OpenSetThresholds(class_fit=-5.0, neighbor_similarity=0.5, far_similarity=0.3, class_fit_alone=-8.0)
    assert t.why_unknown(-9.0, 0.4) == ("class fit -9.000 < -5.000 and nearest indexed item of the model's "
                                        "classes at similarity 0.400 < 0.500")
    assert t.why_unknown(-1.0, 0.1).startswith("nearest indexed item of the model's classes at similarity "
                                               "0.100 < 0.300")
    assert t.why_unknown(-9.0, np.nan).startswith("class fit -9.000 < -8.000, judged alone")
    assert t.why_unknown(-1.0, 0.9) == ""
    for thresholds in (t, OpenSetThresholds(class_fit=-5.0, neighbor_similarity=0.5)):  # and an older file's
        for fit in (-10.0, -8.0, -6.0, -5.0, -1.0):
            for sim in (np.nan, 0.1, 0.3, 0.45, 0.5, 0.9):
                assert bool(thresholds.why_unknown(fit, sim)) == bool(thresholds.is_unknown(fit, sim)), (fit, sim)


def test_eval_and_the_server_apply_one_rule_on_a_grid_of_edges() -> None:
    """``pictor eval`` takes ``is_unknown`` over arrays, the server ``why_unknown`` per image:
    they must agree everywhere, at each threshold and either side of it, with NaN scores."""
    t = OpenSetThresholds(class_fit=-5.0, neighbor_similarity=0.5, far_similarity=0.3, class_fit_alone=-8.0)
    older = OpenSetThresholds(class_fit=-5.0, neighbor_similarity=0.5)  # far and alone tests off (-inf)

    def around(*edges: float) -> list[float]:
        return [x for e in edges for x in (np.nextafter(e, -np.inf), e, np.nextafter(e, np.inf))]

    fits = [-np.inf, np.nan, *around(-8.0, -5.0), 0.0]
    sims = [np.nan, -1.0, *around(0.3, 0.5), 1.0]
    fit, sim = (a.ravel() for a in np.meshgrid(fits, sims))
    for thresholds in (t, older):
        unknown = thresholds.is_unknown(fit, sim)
        reasons = [thresholds.why_unknown(f, s) for f, s in zip(fit, sim, strict=True)]
        assert unknown.tolist() == [bool(r) for r in reasons]
        tests = thresholds.tests(fit, sim)
        assert not (tests.pair | tests.far)[np.isnan(sim)].any()  # no neighbour: the class fit alone
        judged_alone = [r.endswith("judged alone (no comparable neighbours in the index)") for r in reasons]
        assert tests.fit_alone.tolist() == judged_alone
    # At a threshold an image passes (the tests are strict), just below it it does not.
    assert not t.is_unknown(-5.0, 0.4) and t.is_unknown(np.nextafter(-5.0, -np.inf), 0.4)
    assert not t.is_unknown(0.0, 0.3) and t.is_unknown(0.0, np.nextafter(0.3, -np.inf))
    assert not t.is_unknown(-8.0, np.nan) and t.is_unknown(np.nextafter(-8.0, -np.inf), np.nan)


def clusters(rng: np.random.Generator, centres: np.ndarray, n: int, spread: float = 0.3
             ) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points around each centre (rows of ``centres``) and their integer labels."""
    x = np.concatenate([c + spread * rng.normal(size=(n, centres.shape[1])) for c in centres])
    return x.astype(np.float32), np.repeat(np.arange(len(centres)), n)


def test_class_gaussians_score_unknown_cluster_below_known() -> None:
    rng = np.random.default_rng(0)
    centres = 2.0 * rng.normal(size=(4, 8))
    x, y = clusters(rng, centres[:3], 60)
    g = ClassGaussians.fit(x, y, 3)
    known, _ = clusters(rng, centres[:3], 20)
    unknown, _ = clusters(rng, centres[3:], 20)
    k, u = g.score(known), g.score(unknown)
    assert k.shape == (60,) and k.dtype == np.float32
    assert np.mean(u < np.quantile(k, 0.05)) > 0.9  # the unseen class is far from every mean
    back = ClassGaussians.from_dict(g.to_dict())
    np.testing.assert_allclose(back.score(unknown), u, rtol=1e-6)


def test_class_gaussians_keep_fewer_dims_than_samples_and_refuse_missing_class() -> None:
    rng = np.random.default_rng(1)
    x, y = clusters(rng, rng.normal(size=(2, 64)), 10)
    g = ClassGaussians.fit(x, y, 2)
    assert g.basis.shape == (64, 5)  # 20 samples: at most 20 // 4 directions
    assert np.isfinite(g.score(x)).all()
    with pytest.raises(InvalidRequestError, match="every class"):
        ClassGaussians.fit(x, y, 3)


def test_calibrate_without_unknowns_respects_budget() -> None:
    rng = np.random.default_rng(0)
    conf, sim = rng.uniform(0.5, 1, 1000), rng.uniform(0.3, 1, 1000)
    t = calibrate_thresholds(conf, sim, max_known_rejected=0.05)
    assert np.mean(t.is_unknown(conf, sim)) <= 0.05


@pytest.mark.parametrize("n", [20, 30, 45, 50, 70, 150])
def test_a_budget_threshold_leaves_at_most_its_share_below_it(n: int) -> None:
    # np.quantile's interpolation sat above the order statistic: 3 of 50 (6%) for a 5% budget.
    scores = np.random.default_rng(n).normal(size=n)
    assert np.sum(scores < budget_threshold(scores, 0.05)) == int(0.05 * n)
    assert np.sum(scores < budget_threshold(scores, 0.0)) == 0
    assert budget_threshold(scores, 0.999) == scores.max()  # never past the last


def test_calibrate_with_pseudo_unknowns_separates_them() -> None:
    rng = np.random.default_rng(1)
    known_c, known_s = rng.uniform(0.6, 1, 500), rng.uniform(0.6, 1, 500)
    unk_c, unk_s = rng.uniform(0.2, 0.7, 200), rng.uniform(0.2, 0.7, 200)
    t = calibrate_thresholds(
        known_c, known_s, unknown_fit=unk_c, unknown_similarity=unk_s, max_known_rejected=0.1
    )
    assert np.mean(t.is_unknown(known_c, known_s)) <= 0.1
    assert np.mean(t.is_unknown(unk_c, unk_s)) > 0.5


def test_calibrate_rejects_bad_input() -> None:
    with pytest.raises(InvalidRequestError):
        calibrate_thresholds(np.array([]), np.array([]))
    with pytest.raises(InvalidRequestError, match="max_known_rejected"):
        calibrate_thresholds(np.ones(3), np.ones(3), max_known_rejected=1.5)
