"""The linear-probe baseline: what the frozen pretrained features give without any fine-tuning.

L2-regularised logistic regression on standardised pooled base features; C is chosen by
cross-validation on the training images alone (folds by image, so augmented views of one image
never sit on both sides). A fine-tuned model that scores below its own probe has a broken recipe.
"""
from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)


def fit(train_views: np.ndarray, labels: np.ndarray, seed: int, folds: int = 3):
    """A fitted probe on (views, N, F) training features and N labels; `.best_params_` has C."""
    views, n, _ = train_views.shape
    x = np.asarray(train_views, dtype=np.float32).reshape(views * n, -1)
    y = np.tile(np.asarray(labels).reshape(-1).astype(int), views)
    groups = np.tile(np.arange(n), views)
    folds = max(2, min(folds, int(np.bincount(y).min())))
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, class_weight="balanced",
                                                               random_state=seed))
    search = GridSearchCV(model, {"logisticregression__C": list(C_GRID)}, scoring="neg_log_loss",
                          cv=GroupKFold(n_splits=folds), n_jobs=1)
    search.fit(x, y, groups=groups)
    return search


def regularisation(probe) -> float:
    return float(probe.best_params_["logisticregression__C"])


def head_weights(fitted) -> tuple[np.ndarray, np.ndarray]:
    """(kernel (F, K), bias (K,)) of a Dense layer on raw features that computes the probe's logits
    (standardisation folded in), so a linear head starts exactly at the probe (LP-FT)."""
    scaler, regression = fitted.best_estimator_.steps[0][1], fitted.best_estimator_.steps[-1][1]
    coef = regression.coef_ / scaler.scale_  # (K, F), K = 1 for two classes
    bias = regression.intercept_ - coef @ scaler.mean_
    return coef.T.astype(np.float32), bias.astype(np.float32)
