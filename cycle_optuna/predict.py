"""The best model on new data: `cycle-optuna predict STUDY.toml FILE` and :func:`predict_file`.

The file is read as the study's own data files are (any format the study reads, its ``[data]``
column names and layout). Its labels are optional where a format can leave them out (a ``.csv``
without the label column, an ``.npz`` without ``y``); when present they must be the study's
classes, and the accuracy is reported beside the predictions.
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cycle_optuna import api
from cycle_optuna.errors import DataError, StorageError

if TYPE_CHECKING:
    from optuna.storages import BaseStorage

    from cycle_optuna.best_model import CycleModel


@dataclass(frozen=True)
class Predictions:
    """Class probabilities of every series of one file, in file order."""

    path: Path
    classes: tuple[str, ...]  # the study's class names, in index order
    ids: list[str] | None  # a .csv file's sample ids; None: series are known by their position
    proba: np.ndarray  # [N, K]
    labels: np.ndarray | None  # the file's own class indices, when it has labels
    cycles: tuple[int, ...]  # the cycles whose models were averaged, best first
    refit: bool = False  # their configurations trained on all training series (`refit`)

    @property
    def predicted(self) -> np.ndarray:
        return self.proba.argmax(axis=1)

    @property
    def accuracy(self) -> float | None:
        return None if self.labels is None else float(np.mean(self.predicted == self.labels))

    def rows(self) -> list[dict[str, Any]]:
        """One record per series: position, id (.csv), predicted class, true class (when known), probabilities."""
        out = []
        for i, p in enumerate(self.proba):
            row: dict[str, Any] = {"series": i}
            if self.ids is not None:
                row["id"] = self.ids[i]
            row["predicted"] = self.classes[int(p.argmax())]
            if self.labels is not None:
                row["label"] = self.classes[int(self.labels[i])]
            row.update({f"p_{name}": round(float(v), 6) for name, v in zip(self.classes, p)})
            out.append(row)
        return out

    def to_csv(self) -> str:
        rows = self.rows()
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buf.getvalue()


def predict_file(study: api.StudyLike, path: str | Path, storage: str | BaseStorage | None = None, *,
                 model: CycleModel | None = None) -> Predictions:
    """The best model's (see :func:`api.load_best_model`) class probabilities for each series of `path`."""
    from cycle_optuna.best_model import CycleModel
    from cycle_optuna.data import read_inputs

    if model is not None and not isinstance(model, CycleModel):
        raise TypeError(f"model: expected a CycleModel (load_best_model's), got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a file path, got {type(path).__name__}")
    study = api.load_study(study, storage)
    cfg = api.study_config(study)
    stats = study.user_attrs.get(api.STATS_ATTR)
    if cfg is None or not stats:
        raise StorageError(f"study {study.study_name!r} has no stored cycle-optuna config and data statistics; "
                           "it cannot read a data file as its own")
    classes = tuple(stats.get("class_names") or (str(k) for k in range(int(stats["n_classes"]))))
    path = Path(path)
    features = tuple(stats["feature_names"]) if stats.get("feature_names") else None  # a .csv study's, by name
    x, y, ids = read_inputs(path, cfg.data, classes, features=features)
    n_features, seq_len = int(stats["n_features"]), int(stats["seq_len"])
    if x.shape[2] != n_features:
        raise DataError(f"{path}: {x.shape[2]} feature(s) per step, the study's data has {n_features}")
    if x.shape[1] > seq_len:  # the model's positions end at the training data's longest series
        longest = int(np.flatnonzero(~np.isnan(x).all(axis=(0, 2)))[-1]) + 1
        if longest > seq_len:
            raise DataError(f"{path}: series of up to {longest} steps, the study's model reads at most {seq_len}")
        x = x[:, :seq_len]
    model = model if model is not None else api.load_best_model(study)
    step, parts = cfg.train.eval_batch_size, []
    for i in range(0, len(x), step):
        try:
            parts.append(model.predict_proba(x[i:i + step]))
        except DataError as e:
            if (bad := getattr(e, "series", None)) is None:
                raise
            # what the file's checks cannot see: values the model overflows on
            more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise DataError(f"{path}: series {i + bad[0]}{more}: {e.detail}") from None
    proba = np.concatenate(parts)
    return Predictions(path=path, classes=classes, ids=ids, proba=proba, labels=y,
                       cycles=tuple(n + 1 for n in model.trial_numbers), refit=bool(getattr(model, "refit", False)))
