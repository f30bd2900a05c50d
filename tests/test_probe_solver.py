"""The JAX logistic-regression probe against scikit-learn, and the C grid that widens itself at its edges."""

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from igpt_jax.probing import linear_probe, logreg_jax


@pytest.fixture(scope="module")
def digits_features():
    """Fixed features of the 8x8 digits: two 'layers' (pixels, and a random ReLU layer of them), standardised."""
    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    hidden = np.maximum(x @ rng.normal(size=(64, 64)) / 8.0, 0.0)
    layers = np.stack([x, hidden], axis=1).astype(np.float32)  # [n, 2, 64]
    order = rng.permutation(len(y))
    layers, y = layers[order], y[order]
    return (layers[:1000], y[:1000]), (layers[1000:1400], y[1000:1400]), (layers[1400:], y[1400:])


def test_jax_solver_equals_scikit_learn_within_0_3_points_at_every_C(digits_features):
    (tx, ty), _, (sx, sy) = digits_features
    for pos in range(tx.shape[1]):
        std = linear_probe.Standardizer.fit(tx[:, pos])
        xs, xt = std(tx[:, pos]), std(sx[:, pos])
        Cs = [1e-3, 1e-2, 0.1, 1.0, 10.0]
        w, b, _ = logreg_jax.fit(np.stack([xs] * len(Cs)), ty, np.array(Cs), num_classes=10)  # 5 problems at once
        for i, C in enumerate(Cs):
            with threadpool_limits(1):
                ref = LogisticRegression(C=C, max_iter=1000).fit(xs, ty)
            ours = np.mean(np.argmax(xt @ w[i] + b[i], -1) == sy)
            assert abs(ours - ref.score(xt, sy)) <= 0.003, (pos, C)
            if C <= 1.0:  # well conditioned: the same minimiser
                np.testing.assert_allclose(w[i], ref.coef_.T, atol=2e-3)
                np.testing.assert_allclose(b[i], ref.intercept_, atol=2e-3)


def test_jax_solver_batched_equals_one_at_a_time_and_warm_start_reaches_the_same_optimum(digits_features):
    (tx, ty), _, _ = digits_features
    x = np.stack([linear_probe.Standardizer.fit(tx[:, p])(tx[:, p]) for p in range(2)])
    w, b, _ = logreg_jax.fit(x, ty, np.array([0.1, 0.1]), num_classes=10)
    w1, b1, _ = logreg_jax.fit(x[1:], ty, 0.1, num_classes=10)
    np.testing.assert_allclose(w[1], w1[0], atol=1e-4)
    cold_w, cold_b, cold_it = logreg_jax.fit(x, ty, np.array([1.0, 1.0]), num_classes=10)
    warm_w, warm_b, warm_it = logreg_jax.fit(x, ty, np.array([1.0, 1.0]), num_classes=10, init=(w, b))
    offset = np.zeros(10, np.float32)
    for p in range(2):
        cold = logreg_jax.objective(cold_w[p], cold_b[p], x[p], ty, 1.0, offset)
        warm = logreg_jax.objective(warm_w[p], warm_b[p], x[p], ty, 1.0, offset)
        assert float(warm) == pytest.approx(float(cold), rel=1e-3)
    assert (warm_it < cold_it).all()


def test_mapped_and_vmapped_problems_reach_the_same_solutions(digits_features):
    """'map' (default: each problem stops at its own convergence) and 'vmap' solve the same problems alike."""
    (tx, ty), _, _ = digits_features
    x = np.stack([linear_probe.Standardizer.fit(tx[:, p])(tx[:, p]) for p in range(2)])
    C = np.array([0.01, 1.0])  # one fast, one slow problem: vmap's loop runs both to the slow one's count
    mw, mb, mit = logreg_jax.fit(x, ty, C, num_classes=10, batching="map")
    vw, vb, vit = logreg_jax.fit(x, ty, C, num_classes=10, batching="vmap")
    np.testing.assert_array_equal(mit, vit)  # each problem's own iteration count
    assert mit[0] < mit[1]
    np.testing.assert_allclose(mw, vw, atol=1e-4)
    np.testing.assert_allclose(mb, vb, atol=1e-4)
    with pytest.raises(ValueError, match=r"batching='scan': expected one of \('map', 'vmap'\)"):
        logreg_jax.fit(x, ty, C, num_classes=10, batching="scan")


def test_absent_classes_are_never_predicted():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 60, 5)).astype(np.float32)
    y = rng.integers(0, 3, 60)  # classes 3 and 4 absent
    w, b, _ = logreg_jax.fit(x, y, 1.0, num_classes=5)
    assert np.isneginf(b[0, 3:]).all() and np.isfinite(b[0, :3]).all()
    assert set(np.argmax(x[0] @ w[0] + b[0], -1)) <= {0, 1, 2}


def test_probe_with_the_jax_solver_matches_scikit_learn_per_layer(digits_features):
    train, val, test = digits_features
    res = {}
    for solver in ("jax_lbfgs", "lbfgs"):
        settings = linear_probe.ProbeSettings(solver=solver, C=(1e-3, 1e-2, 0.1, 1.0), C_widen=0)
        res[solver] = linear_probe.probe(train, val, test, settings, num_classes=10)
    for ours, ref in zip(res["jax_lbfgs"]["layers"], res["lbfgs"]["layers"]):
        for C, acc in ref["val_accuracy_by_C"].items():
            assert abs(ours["val_accuracy_by_C"][C] - acc) <= 0.003
        assert abs(ours["test_accuracy"] - ref["test_accuracy"]) <= 0.003
    assert abs(res["jax_lbfgs"]["best"]["test_accuracy"] - res["lbfgs"]["best"]["test_accuracy"]) <= 0.003


# ----------------------------------------------------------------------------------------------- C grid widening


def scripted_search(monkeypatch, peaks, grid, widen=4, bounds=(1e-6, 1e4)):
    """`search_C` with a stand-in solver whose 'weights' are C: problem p's accuracy peaks at C = peaks[p]."""
    fitted = []

    def fake_fit(x, y, C, settings, *, num_classes, init=None):
        fitted.append(np.array(C))
        return np.asarray(C, np.float64)[:, None, None] * np.ones((1, 1, 1)), np.zeros((len(C), 1))

    def score(w, b):  # higher the closer log C is to the peak
        return np.array([-abs(np.log10(w[p, 0, 0]) - np.log10(peaks[p])) for p in range(len(peaks))])

    monkeypatch.setattr(linear_probe, "fit_logistic", fake_fit)
    settings = linear_probe.ProbeSettings(C=grid, C_widen=widen, C_bounds=bounds)
    x = np.zeros((len(peaks), 4, 2), np.float32)
    return linear_probe.search_C(x, np.zeros(4, int), score, settings, num_classes=2), fitted


def test_grid_widens_upward_and_downward_per_problem_until_the_best_is_inside(monkeypatch):
    search, _ = scripted_search(monkeypatch, peaks=[1.0, 1e-2, 1e-5], grid=(1e-3, 1e-2, 1e-1))
    assert search.best(0) == pytest.approx(1.0)  # 1e-1 was the top edge: widened to 1, 10
    assert sorted(search.accuracies[0]) == pytest.approx([1e-3, 1e-2, 1e-1, 1.0, 10.0])
    assert sorted(search.accuracies[1]) == pytest.approx([1e-3, 1e-2, 1e-1])  # inner best: nothing added
    assert search.best(2) == pytest.approx(1e-5)  # bottom edge: widened down to 1e-4, 1e-5, 1e-6
    assert sorted(search.accuracies[2]) == pytest.approx([1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1])
    for p in range(3):  # the chosen C is never at the edge of what the problem tried
        tried = sorted(search.accuracies[p])
        assert tried[0] < search.best(p) < tried[-1]


def test_grid_widening_stops_at_the_bound_and_after_C_widen_values(monkeypatch):
    search, _ = scripted_search(monkeypatch, peaks=[1e6], grid=(0.1, 1.0), widen=10, bounds=(1e-6, 100.0))
    assert max(search.accuracies[0]) == pytest.approx(100.0)  # 10, 100; 1000 is beyond the bound
    search, fitted = scripted_search(monkeypatch, peaks=[1e6], grid=(0.1, 1.0), widen=2)
    assert sorted(search.accuracies[0]) == pytest.approx([0.1, 1.0, 10.0, 100.0]) and len(fitted) == 4
    search, fitted = scripted_search(monkeypatch, peaks=[1e6], grid=(0.1, 1.0), widen=0)
    assert len(fitted) == 2


def test_ties_choose_the_stronger_regularisation():
    search = linear_probe.GridSearch([{0.1: 0.5, 1.0: 0.7, 10.0: 0.7}], [{}])
    assert search.best(0) == 1.0


def test_auto_fits_small_problems_with_scikit_learn_and_large_ones_with_the_jax_solver(monkeypatch):
    """'auto' (the default) picks by problems x examples x features against the measured crossover."""
    assert linear_probe.ProbeSettings().solver == "auto"
    at = linear_probe.AUTO_JAX_FROM
    assert linear_probe.solver_for("auto", 1, at, 1) == "jax_lbfgs"
    assert linear_probe.solver_for("auto", 1, at - 1, 1) == "lbfgs"
    assert linear_probe.solver_for("lbfgs", 1, at, 1) == "lbfgs"  # an explicit solver is kept
    calls = []
    monkeypatch.setattr(logreg_jax, "fit", lambda x, *a, **k: calls.append("jax") or (
        np.zeros((len(x), x.shape[2], 3)), np.zeros((len(x), 3)), None))
    monkeypatch.setattr(linear_probe, "_lbfgs_fit", lambda x, *a: calls.append("sklearn") or (
        np.zeros((x.shape[1], 3)), np.zeros(3)))
    y = np.arange(8) % 3
    for d in (at // 16 - 1, at // 16):  # 2 problems x 8 examples x d features: just below and at the crossover
        linear_probe.fit_logistic(np.zeros((2, 8, d), np.float32), y, np.ones(2), linear_probe.ProbeSettings(),
                                  num_classes=3)
    assert calls == ["sklearn", "sklearn", "jax"]
