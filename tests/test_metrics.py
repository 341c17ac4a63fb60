"""Twins-only metrics against values computed by hand."""
import numpy as np
import pytest
import torch

from helpers import tiny_settings
from twins.run import build, prepare
from twins.model import embed_images
from twins.metrics import equal_error, protocol_scores, verification_report


def test_eer_auc_accuracy_on_hand_computed_scores():
    # genuine: 0.9 0.8 0.4 ; impostor: 0.7 0.3 0.2 0.1
    scores = np.array([0.9, 0.8, 0.4, 0.7, 0.3, 0.2, 0.1])
    genuine = np.array([1, 1, 1, 0, 0, 0, 0], bool)
    rep = verification_report(scores, genuine, threshold=0.5)
    # AUC: of 12 (genuine, impostor) pairs, only (0.4, 0.7) is mis-ordered -> 11/12
    assert rep["auc"] == pytest.approx(11 / 12)
    # accepted at 0.5: 0.9 0.8 0.7 -> genuine accepted 2/3, impostors rejected 3/4 -> 5/7 correct
    assert rep["accuracy"] == pytest.approx(5 / 7)
    assert rep["balanced_accuracy"] == pytest.approx(0.5 * (2 / 3 + 3 / 4))
    # ROC points (FAR, FRR): ... (0, 1/3) at t=0.8, (1/4, 1/3) at t=0.7, (1/4, 0) at t=0.4;
    # FAR = FRR crosses between the last two, where FAR = 1/4 and FRR falls from 1/3 to 0: EER = 1/4
    eer, thr = equal_error(scores, genuine)
    assert eer == pytest.approx(0.25)
    assert 0.4 <= thr <= 0.7
    assert rep["n_genuine"] == 3 and rep["n_impostor"] == 4
    assert rep["tar@far=0.01"] is None  # 4 impostor pairs cannot measure a 1% FAR


def test_perfect_and_inverted_scores():
    genuine = np.array([1, 1, 0, 0], bool)
    assert equal_error(np.array([0.9, 0.8, 0.2, 0.1]), genuine)[0] == pytest.approx(0.0)
    assert equal_error(np.array([0.1, 0.2, 0.8, 0.9]), genuine)[0] == pytest.approx(1.0)
    rnd = np.random.default_rng(0)
    g = rnd.random(4000) < 0.5
    assert equal_error(rnd.random(4000), g)[0] == pytest.approx(0.5, abs=0.03)


def test_tar_at_far_interpolates_the_roc():
    rnd = np.random.default_rng(1)
    imp = rnd.normal(0, 1, 2000)
    gen = rnd.normal(3, 1, 500)
    rep = verification_report(np.concatenate([gen, imp]), np.r_[np.ones(500, bool), np.zeros(2000, bool)])
    cut = np.quantile(imp, 0.99)
    assert rep["tar@far=0.01"] == pytest.approx((gen >= cut).mean(), abs=0.01)
    assert rep["tar@far=0.001"] is not None


def test_protocol_pairs_are_genuine_and_own_twin_only():
    # persons 0,1 are twins; 2,3 are twins; 0 and 2 are strangers (never counted)
    person = np.array([0, 0, 0, 1, 1, 2, 2, 3])
    emb = torch.nn.functional.normalize(torch.randn(8, 4), dim=-1)
    scores, genuine, idx = protocol_scores(emb, person, [(0, 1), (2, 3)])
    assert genuine.sum() == 3 + 1 + 1 + 0  # C(3,2) + C(2,2) + C(2,2) + C(1,2)
    assert (~genuine).sum() == 3 * 2 + 2 * 1
    for (i, j), s, g in zip(idx, scores, genuine):
        assert (person[i] == person[j]) == g
        assert g or {person[i], person[j]} in ({0, 1}, {2, 3})
        assert s == pytest.approx(float(emb[i] @ emb[j]), abs=1e-6)


def test_eer_and_its_threshold_are_interpolated_where_far_and_frr_cross():
    # a genuine and an impostor tie at 0.5: the ROC goes diagonally from (FAR 0, FRR 1/2) to (1/2, 0),
    # so FAR = FRR = 1/4 halfway, at the threshold halfway between 0.9 and 0.5
    eer, thr = equal_error(np.array([0.9, 0.5, 0.5, 0.1]), np.array([1, 1, 0, 0], bool))
    assert eer == pytest.approx(0.25) and thr == pytest.approx(0.7)
    # FAR flat at 1/2 while FRR falls from 2/3 to 0: the crossing is a quarter of the way down
    eer, thr = equal_error(np.array([0.9, 0.8, 0.3, 0.85, 0.2]), np.array([1, 1, 1, 0, 0], bool))
    assert eer == pytest.approx(0.5) and thr == pytest.approx(0.85 + 0.25 * (0.3 - 0.85))


def test_eer_threshold_is_finite_when_the_top_scores_already_separate():
    scores, genuine = np.array([0.9, 0.9, 0.2, 0.1]), np.array([1, 1, 0, 0], bool)
    eer, thr = equal_error(scores, genuine)
    assert eer == 0.0 and np.isfinite(thr)
    assert verification_report(scores, genuine)["accuracy"] == 1.0  # the threshold accepts the genuine pairs
    for one in ([0.8, 0.3, 0.2], [0.9, 0.7, 0.1]):  # a single genuine pair
        assert np.isfinite(equal_error(np.array(one), np.array([1, 0, 0], bool))[1])


def test_validation_metric_is_computed_on_every_validation_image_in_order(tiny_demo):
    s = tiny_settings(tiny_demo, bs=3)  # batches that do not divide the set
    data = prepare(s)
    learn = build(s, data)
    eer, auc = learn.validate()[1:]
    emb = embed_images(learn.model, data.caches["valid"])
    rep = verification_report(*protocol_scores(emb, data.valid.person, data.valid.twin_pairs)[:2])
    assert eer == pytest.approx(rep["eer"], abs=1e-6) and auc == pytest.approx(rep["auc"], abs=1e-6)
    assert learn.valid_report["eer_threshold"] == pytest.approx(rep["eer_threshold"], abs=1e-6)  # the checkpoint's
    metric = learn.metrics[0]  # one process: one embedding more or less than the images is no figure
    embs = metric.embs
    for wrong in (embs + [embs[0][:1]], [torch.cat(embs)[:-1]]):
        metric.embs = wrong
        assert metric.value is None
