"""The best trial's model wrapped with its input normalisation (the one place the queries need torch)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


class CycleModel(torch.nn.Module):
    """The best trial's trained model with its input normalisation: call it on raw data.

    ``model(x)`` returns logits for raw ``[N, T, F]`` input (T <= ``seq_len``, F = ``n_features``);
    ``predict`` returns class indices and ``predict_proba`` class probabilities, for numpy arrays or
    tensors, one ``[T, F]`` sequence or a batch. ``params`` holds the best trial's hyperparameters;
    ``trial_numbers`` the trials whose models it averages (an `Ensemble` net), best first; ``refit``
    whether these are their configurations trained again on all training series (`cycle-optuna refit`).
    """

    def __init__(self, net: torch.nn.Module, mean: Any, std: Any, *, params: dict[str, Any], trial_number: int,
                 trial_numbers: list[int] | None = None, refit: bool = False) -> None:
        super().__init__()
        self.net = net
        # float64: the raw input is normalised in double precision, as in training (a large offset keeps its small changes)
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean, dtype=np.float64)))
        self.register_buffer("std", torch.as_tensor(np.asarray(std, dtype=np.float64)))
        self.params = dict(params)
        self.trial_number = trial_number
        self.trial_numbers = list(trial_numbers) if trial_numbers else [trial_number]  # averaged, best first
        self.refit = refit
        self.n_features = int(self.mean.shape[0])
        self.seq_len = int(getattr(net, "seq_len", 0)) or None  # longest input sequence

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a raw batch ``[N, T, F]`` (a tensor; checked as `predict`'s input is)."""
        from cycle_optuna.errors import DataError

        if not isinstance(x, torch.Tensor):
            raise TypeError(f"model(x) takes a torch tensor [N, T, F], got {type(x).__name__}; "
                            "predict and predict_proba also take numpy arrays and one [T, F] sequence")
        if x.dim() != 3:
            raise DataError(f"model(x) takes a batch [N, T, F], got shape {list(x.shape)}; "
                            "predict and predict_proba also take one [T, F] sequence")
        self._check(x)
        return self._net_logits(x)

    def _net_logits(self, x: torch.Tensor) -> torch.Tensor:
        from cycle_optuna.data import fill_partial

        # NaN marks missing values as in training: filled within a step, all-NaN steps masked by the net
        return self.net(fill_partial(((x.to(self.mean.device).double() - self.mean) / self.std).float()))

    def _check(self, x: torch.Tensor) -> None:
        """DataError for input the model cannot read as a data file's series would be refused: wrong
        shape, inf (or beyond 32-bit floats), a series with no observed value."""
        from cycle_optuna.errors import DataError

        if x.dtype == torch.bool or x.is_complex():  # model(x) as predict: not numbers of a series
            raise DataError(f"input must be real numbers [N, T, F] or [T, F], got dtype {x.dtype}")
        shape = list(x.shape)
        if x.dim() not in (2, 3) or 0 in shape[-2:] or shape[-1] != self.n_features:
            raise DataError(f"input of shape {shape}: expected [N, T, F] or [T, F] with F = {self.n_features} "
                            f"feature(s) per step and 1 <= T <= {self.seq_len} steps")
        if self.seq_len is not None and shape[-2] > self.seq_len:
            raise DataError(f"input of {shape[-2]} steps: the model reads at most {self.seq_len} "
                            "(the training data's longest series); shorter series may be NaN-padded")
        if not x.is_floating_point():
            return  # integers: finite, observed
        if torch.isinf(x).any():
            raise DataError("input holds inf values; only NaN may mark a missing value")
        if (x.abs() > torch.finfo(torch.float32).max).any():  # training data's limit: the model computes in float32
            raise DataError("input holds values beyond 32-bit floats' range (|x| > 3.4e38)")
        empty = torch.isnan(x).flatten(-2).all(-1).reshape(-1).nonzero().flatten().tolist()
        if empty:
            which = "the sequence has" if x.dim() == 2 else f"series {empty[0]}" + (
                f" (and {len(empty) - 1} more)" if len(empty) > 1 else "") + " has"
            raise DataError(f"{which} no observed values (all NaN)")

    def _logits(self, x: Any) -> torch.Tensor:
        from cycle_optuna.errors import DataError

        if not isinstance(x, torch.Tensor):
            x = torch.from_numpy(_numbers(x))
        single = x.dim() == 2
        self._check(x)
        with torch.inference_mode():
            logits = self._net_logits(x[None] if single else x)
        if not (finite := torch.isfinite(logits).all(-1)).all():  # values far past the training data's overflow the net
            bad = (~finite).nonzero().flatten().tolist()
            which = "the sequence" if single else f"series {bad[0]}" + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
            largest = float((x[None] if single else x)[bad[0]].abs().nan_to_num(0).max())
            detail = f"the model's output is not finite (largest |value| {largest:.3g}, far outside the training data's range)"
            err = DataError(f"{which}: {detail}")
            err.series, err.detail = bad, detail  # which series of this call: predict_file names them in its file
            raise err
        return logits[0] if single else logits

    def predict_proba(self, x: Any) -> np.ndarray:
        """Class probabilities for raw input ``[N, T, F]`` (or one ``[T, F]`` sequence)."""
        return torch.softmax(self._logits(x).float(), dim=-1).cpu().numpy()

    def predict(self, x: Any) -> np.ndarray:
        """Class indices for raw input ``[N, T, F]`` (or one ``[T, F]`` sequence)."""
        return self._logits(x).argmax(dim=-1).cpu().numpy()


def _numbers(x: Any) -> np.ndarray:
    """`x` (an array, nested lists, a pandas frame) as a writable float64 array, missing values NaN.

    What a data file marks missing is missing here too: NaN, None, pandas' NA, and the masked entries
    of a numpy masked array (whose data beneath the mask is not a measurement). Booleans, complex
    numbers and text are refused, as in a data file's X."""
    from cycle_optuna.errors import DataError

    mask = np.ma.getmaskarray(x) if isinstance(x, np.ma.MaskedArray) else None
    try:
        raw = np.asarray(np.ma.getdata(x) if mask is not None else x)
    except (TypeError, ValueError) as e:  # ragged nesting
        raise DataError(f"input must be numbers [N, T, F] or [T, F]: {e}") from None
    if raw.dtype.kind == "O":  # pandas' nullable columns hold pd.NA; lists may hold None
        raw = raw.copy()
        raw[np.frompyfunc(lambda v: v is None or type(v).__name__ == "NAType", 1, 1)(raw).astype(bool)] = np.nan
    if raw.dtype.kind not in "iufO" or (raw.dtype.kind == "O" and any(
            isinstance(v, (str, bytes, bool, np.bool_, complex, np.complexfloating)) for v in raw.flat)):
        kind = raw.dtype if raw.dtype.kind != "O" else "object holding text, booleans or complex numbers"
        raise DataError(f"input must be real numbers [N, T, F] or [T, F], got dtype {kind}")
    try:
        out = np.asarray(raw, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DataError(f"input must be numbers [N, T, F] or [T, F]: {e}") from None
    if mask is not None and mask.any():
        out = np.where(mask, np.nan, out)
    # torch wraps neither a reversed view (negative strides) nor, without a warning, a read-only one
    # (a pandas frame's); nothing here writes to the input, so the caller's array is used where it can be
    out = np.ascontiguousarray(out)
    return out if out.flags.writeable else out.copy()


class Ensemble(torch.nn.Module):
    """Several trained nets on the same normalised input: returns the log of their mean class
    probabilities, so softmax, argmax and cross-entropy read it as logits."""

    def __init__(self, nets: list[torch.nn.Module]) -> None:
        super().__init__()
        self.nets = torch.nn.ModuleList(nets)
        self.seq_len = min(int(getattr(n, "seq_len", 0)) for n in nets) or None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logp = torch.stack([torch.log_softmax(n(x).float(), dim=-1) for n in self.nets])
        return torch.logsumexp(logp, dim=0) - math.log(len(self.nets))
