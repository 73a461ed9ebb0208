"""Generate nine UCR-format (.ts) classification sets of kinds not in benchmarks/make_sets.py.

    .venv/bin/python benchmarks/make_kinds.py DIR [NAME ...]   # all sets, or only these
    .venv/bin/python benchmarks/accuracy.py --data-dir DIR --datasets MotifPos --threads 1

Each set: DIR/<Name>/<Name>_TRAIN.ts and _TEST.ts, one seed per set, series in shuffled order.

- MotifPos:    T=300, 4 classes = which 30-step motif (1 sine cycle, 2 sine cycles, triangle bump,
               chirp; each scaled to RMS 1.5) is added at a uniform random position to white noise
               (std 1). Train 160 (40/class), test 400.
- FreqPhase:   T=128, 4 classes = oscillation frequency 8/11/14/17 cycles per series (+-1.0 jitter),
               random phase, amplitude U(0.5, 2), white noise std 1.0. Train 160, test 400.
- MultiSparse: 10 channels, T=100; every channel gets one Gaussian bump (width 4, amplitude 2.5,
               random sign, random position) on noise std 1; class (4) = (sign of ch 2's bump, sign
               of ch 7's bump); the other 8 channels' signs are random. Train 200, test 400.
- Imbalanced:  T=128, classes normal/bump/doublet at 80/15/5 %; background = 3 random low-frequency
               sinusoids + noise 0.5; bump = +1.5 Gaussian (width 3) at random 20..108; doublet = the
               same bump and a -1.5 one 15 steps later. Train 300 (240/45/15), test 500 (400/75/25).
- OrderAB:     T=200, events A (one sine cycle, up first) and B (one sine cycle, down first), 16
               steps each, amplitude 2.5, at random non-overlapping times on noise std 0.5; class =
               whether A comes before B. Train 200 (100/class), test 400.
- NearDup:     T=160, 30 classes; all share one smooth shape (amplitude ~2) and differ only by a
               class-specific fine detail (4 sinusoids of 12-30 cycles, total RMS ~0.3); noise std
               0.1, no shift: 1-NN's home ground. Train 2 per class (60), test 10 per class (300).
- NearDupNoisy: the same recipe (other templates) with noise std 0.5, where 1-NN drops to ~0.85.
- NoiseColour: T=256, 3 classes = AR(1) coefficient 0 / 0.25 / 0.5 of unit-variance noise, times a gain
               U(0.5, 2) plus an offset N(0, 1): only the spectral texture tells. Train 150, test 300.
- Warped:      T=150, 8 classes = smooth random template (5 sinusoids, amplitude 1/j) under a random
               monotone piecewise-linear time warp (3 knots moved by N(0, 0.08)), noise std 0.3.
               Train 160 (20/class), test 400.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def write_ts(out: Path, name: str, part: str, x: np.ndarray, y: list[str], classes: list[str]) -> None:
    """x: [N, C, T]."""
    n, c, t = x.shape
    head = [f"@problemName {name}", "@timeStamps false", "@missing false",
            f"@univariate {'true' if c == 1 else 'false'}"]
    if c > 1:
        head.append(f"@dimensions {c}")
    head += ["@equalLength true", f"@seriesLength {t}", f"@classLabel true {' '.join(classes)}", "@data"]
    rows = [":".join(",".join(f"{v:.4f}" for v in x[i, k]) for k in range(c)) + f":{y[i]}" for i in range(n)]
    (out / name).mkdir(parents=True, exist_ok=True)
    (out / name / f"{name}_{part}.ts").write_text("\n".join(head + rows) + "\n")


def emit(out: Path, name: str, gen, counts: dict[str, tuple[int, int]], classes: list[str], seed: int) -> None:
    rng = np.random.default_rng(seed)
    for j, part in enumerate(("TRAIN", "TEST")):
        labels = [c for c in classes for _ in range(counts[c][j])]
        xs = np.stack([gen(c, rng) for c in labels])
        order = rng.permutation(len(labels))
        write_ts(out, name, part, xs[order], [labels[i] for i in order], classes)


def gauss(t: np.ndarray, mu: float, width: float) -> np.ndarray:
    return np.exp(-0.5 * ((t - mu) / width) ** 2)


# 1. motif identity at a random position
def motif_pos():
    T, L = 300, 30
    u = np.linspace(0, 1, L)
    motifs = [np.sin(2 * np.pi * u), np.sin(4 * np.pi * u), 1 - np.abs(2 * u - 1) - 0.5,
              np.sin(2 * np.pi * (1 * u + 2 * u ** 2))]
    motifs = [1.5 * m / np.sqrt(np.mean(m ** 2)) for m in motifs]

    def gen(c: str, rng):
        x = rng.normal(0, 1, T)
        p = rng.integers(0, T - L + 1)
        x[p:p + L] += motifs[int(c[1])]
        return x[None]
    return gen


# 2. frequency of an oscillation
def freq_phase(c: str, rng):
    T = 128
    f = (8, 11, 14, 17)[int(c[1])] + rng.uniform(-1.0, 1.0)
    t = np.arange(T) / T
    x = rng.uniform(0.5, 2) * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)) + rng.normal(0, 1.0, T)
    return x[None]


# 3. multivariate, class in 2 of 10 channels
def multi_sparse(c: str, rng):
    C, T = 10, 100
    t = np.arange(T)
    k = int(c[1])
    signs = rng.choice([-1.0, 1.0], C)
    signs[2] = 1.0 if k & 1 else -1.0
    signs[7] = 1.0 if k & 2 else -1.0
    x = rng.normal(0, 1, (C, T))
    for ch in range(C):
        x[ch] += 2.5 * signs[ch] * gauss(t, rng.uniform(8, T - 8), 4)
    return x


# 4. imbalanced 80/15/5
def imbalanced(c: str, rng):
    T = 128
    t = np.arange(T)
    x = sum(rng.normal(0, 0.7) * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t / T + rng.uniform(0, 6.28))
            for _ in range(3)) + rng.normal(0, 0.5, T)
    if c in ("bump", "doublet"):
        p = rng.uniform(20, 93)
        x = x + 1.5 * gauss(t, p, 3)
        if c == "doublet":
            x = x - 1.5 * gauss(t, p + 15, 3)
    return x[None]


# 5. temporal order of two events
def order_ab(c: str, rng):
    T, L = 200, 16
    ev = 2.5 * np.sin(2 * np.pi * np.linspace(0, 1, L, endpoint=False))
    x = rng.normal(0, 0.5, T)
    while True:
        a, b = rng.integers(0, T - L + 1, 2)
        if abs(a - b) >= L:
            break
    if (a < b) != (c == "AB"):
        a, b = b, a
    x[a:a + L] += ev
    x[b:b + L] -= ev
    return x[None]


# 6. near-duplicate templates, 1-NN's home ground
def near_dup(k: int, seed: int, noise: float = 0.1):
    T = 160
    t = np.arange(T) / T
    rng = np.random.default_rng(seed)
    common = sum(rng.normal(0, 1.5 / (j + 1)) * np.sin(2 * np.pi * (j + 1) * t + rng.uniform(0, 6.28)) for j in range(4))
    templates = []
    for _ in range(k):
        d = sum(np.sin(2 * np.pi * rng.uniform(12, 30) * t + rng.uniform(0, 6.28)) for _ in range(4))
        templates.append(common + 0.3 * d / np.sqrt(np.mean(d ** 2)))

    def gen(c: str, rng):
        return (templates[int(c[1:])] + rng.normal(0, noise, T))[None]
    return gen


# 7. class = colour of the noise (AR(1) coefficient), unit marginal variance
def noise_colour(c: str, rng):
    T = 256
    phi = (0.0, 0.25, 0.5)[int(c[1])]
    e = rng.normal(0, np.sqrt(1 - phi ** 2), T + 50)
    x = np.zeros(T + 50)
    for i in range(1, T + 50):
        x[i] = phi * x[i - 1] + e[i]
    return (x[50:] * rng.uniform(0.5, 2) + rng.normal(0, 1))[None]


# 8. smooth class templates under a random monotone time warp
def warped(k: int, seed: int):
    T = 150
    t = np.linspace(0, 1, T)
    r = np.random.default_rng(seed)
    templates = [sum(r.normal(0, 1 / (j + 1)) * np.sin(2 * np.pi * (j + 1) * t + r.uniform(0, 6.28)) for j in range(5))
                 for _ in range(k)]

    def gen(c: str, rng):
        knots = np.sort(rng.uniform(0, 1, 3))
        moved = np.clip(knots + rng.normal(0, 0.08, 3), 0.02, 0.98)
        warp = np.interp(t, np.r_[0, knots, 1], np.r_[0, np.sort(moved), 1])
        return (np.interp(warp, t, templates[int(c[1:])]) + rng.normal(0, 0.3, T))[None]
    return gen


def main(out: Path, only: set[str]) -> None:
    def emit_(name, *a, **k):
        if not only or name in only:
            emit(out, name, *a, **k)
    emit_("MotifPos", motif_pos(), {f"m{i}": (40, 100) for i in range(4)}, [f"m{i}" for i in range(4)], seed=101)
    emit_("FreqPhase", freq_phase, {f"f{i}": (40, 100) for i in range(4)}, [f"f{i}" for i in range(4)], seed=102)
    emit_("MultiSparse", multi_sparse, {f"s{i}": (50, 100) for i in range(4)}, [f"s{i}" for i in range(4)], seed=103)
    emit_("Imbalanced", imbalanced, {"normal": (240, 400), "bump": (45, 75), "doublet": (15, 25)},
         ["normal", "bump", "doublet"], seed=104)
    emit_("OrderAB", order_ab, {"AB": (100, 200), "BA": (100, 200)}, ["AB", "BA"], seed=105)
    emit_("NearDup", near_dup(30, seed=106), {f"c{i}": (2, 10) for i in range(30)}, [f"c{i}" for i in range(30)],
         seed=107)
    emit_("NearDupNoisy", near_dup(30, seed=108, noise=0.5), {f"c{i}": (2, 10) for i in range(30)},
          [f"c{i}" for i in range(30)], seed=109)
    emit_("NoiseColour", noise_colour, {f"a{i}": (50, 100) for i in range(3)}, [f"a{i}" for i in range(3)], seed=110)
    emit_("Warped", warped(8, seed=111), {f"w{i}": (20, 50) for i in range(8)}, [f"w{i}" for i in range(8)], seed=112)
    print("wrote", ", ".join(sorted(p.name for p in out.iterdir() if p.is_dir())), "under", out)


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        sys.exit(__doc__.split("\n\n")[1] if len(sys.argv) > 1 else "usage: make_kinds.py DIR [NAME ...]")
    main(Path(sys.argv[1]), set(sys.argv[2:]))
