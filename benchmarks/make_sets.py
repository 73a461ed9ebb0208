"""Write extra data sets for benchmarks/accuracy.py into DIR/<Name>/<Name>_TRAIN and _TEST files.

- ``SynthCBF``: Cylinder-Bell-Funnel (Saito 1994): 3 classes, 128 steps, 30 training and 900 test
  series, each z-normalised, as the UCR archive's CBF is built; written from the definition.
- ``SynthControl``: synthetic control charts (Alcock & Manolopoulos 1999): 6 classes (normal,
  cyclic, up and down trend, up and down shift), 60 steps, 300 training and 300 test series.
- ``Watch`` (with ``--watch-npy``): the 6-channel smartwatch recordings of shoulder exercises that
  the seglearn 1.2.5 wheel ships (``seglearn/data/watch_dataset.npy``: 140 series of 1,032-2,618
  steps, 7 exercises), split by subject: 3 of the 10 subjects (drawn with seed 0) are the test file,
  so the test asks for people the model has not seen. ``pip download --no-deps seglearn==1.2.5``,
  unzip. Its labels are written 0-6; the series keep their own lengths (a ``.ts`` file).

- ``GunPointRaw`` and ``ArrowHeadRaw`` (with ``--raw-from DIR``, a folder holding the archive's
  ``GunPoint`` and ``ArrowHead`` ``.ts`` files, e.g. the aeon wheel's datasets/data): recordings each
  taken at its own offset and gain, as raw sensor exports are and the archive's z-normalised series
  are not: every series times a gain drawn log-uniform in 0.3..3, plus an offset drawn N(0, 3)
  (seed 3, GunPoint's TRAIN, TEST, then ArrowHead's).

- ``ManyFew`` and ``ManyFewB``: many classes of a few series each, where 1-NN is hard to beat:
  each class a smooth random template (6 sinusoids, amplitude 1/j), each series its template
  shifted by up to 10 steps, scaled by U(0.9, 1.1), plus noise of std 0.7. ManyFew: 40 classes,
  4 training and 10 test series each, 128 steps (seed 7); ManyFewB: 25 classes, 6 and 10, 200
  steps (seed 11).

    python benchmarks/make_sets.py DIR [--watch-npy PATH] [--raw-from UCR_DIR]
    python benchmarks/accuracy.py --data-dir DIR --datasets SynthCBF SynthControl Watch ManyFew ManyFewB
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def _znorm(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(1, keepdims=True)) / (x.std(1, keepdims=True) + 1e-8)


def cbf(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    t = np.arange(1, 129)
    xs, ys = [], []
    for i in range(n):
        c = i % 3
        a = rng.uniform(16, 32)
        b = a + rng.uniform(32, 96)
        height = 6 + rng.normal()
        window = ((t >= a) & (t <= b)).astype(float)
        shape = (1.0, (t - a) / (b - a), (b - t) / (b - a))[c]
        xs.append(height * window * shape + rng.normal(size=t.size))
        ys.append(c + 1)
    return _znorm(np.array(xs)), np.array(ys)


def control(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    length = 60
    t = np.arange(length)
    xs, ys = [], []
    for i in range(n):
        c = i % 6
        x = 30 + 2 * rng.uniform(-3, 3, length)
        if c == 1:
            x = x + rng.uniform(10, 15) * np.sin(2 * np.pi * t / rng.uniform(10, 15))
        elif c in (2, 3):
            x = x + (1 if c == 2 else -1) * rng.uniform(0.2, 0.5) * t
        elif c in (4, 5):
            step = (t >= rng.uniform(length / 3, 2 * length / 3)).astype(float)
            x = x + (1 if c == 4 else -1) * rng.uniform(7.5, 20) * step
        xs.append(x)
        ys.append(c + 1)
    return _znorm(np.array(xs)), np.array(ys)


def write_tsv(out: Path, name: str, gen, n_train: int, n_test: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    (out / name).mkdir(parents=True, exist_ok=True)
    for part, n in (("TRAIN", n_train), ("TEST", n_test)):
        x, y = gen(n, rng)
        order = rng.permutation(n)
        lines = ["\t".join([str(y[i]), *(f"{v:.6f}" for v in x[i])]) for i in order]
        (out / name / f"{name}_{part}.tsv").write_text("\n".join(lines) + "\n")


def write_many_few(out: Path, name: str, k: int, n_train: int, n_test: int, steps: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, steps)
    templates = [sum(rng.normal(0, 1 / (j + 1)) * np.sin(2 * np.pi * (j + 1) * t + rng.uniform(0, 6.28))
                     for j in range(6)) for _ in range(k)]
    (out / name).mkdir(parents=True, exist_ok=True)
    for part, n in (("TRAIN", n_train), ("TEST", n_test)):
        lines = [f"@problemName {name}", "@timeStamps false", "@univariate true", "@equalLength true",
                 f"@seriesLength {steps}", f"@classLabel true {' '.join(f'c{c}' for c in range(k))}", "@data"]
        for c in range(k):
            for _ in range(n):
                x = np.roll(templates[c], rng.integers(-10, 11)) * rng.uniform(0.9, 1.1) + rng.normal(0, 0.7, steps)
                lines.append(",".join(f"{v:.4f}" for v in x) + f":c{c}")
        (out / name / f"{name}_{part}.ts").write_text("\n".join(lines) + "\n")


def write_watch(out: Path, npy: Path) -> None:
    d = np.load(npy, allow_pickle=True).item()
    xs, ys, subjects = d["X"], np.asarray(d["y"]), np.asarray(d["subject"])
    ids = np.unique(subjects)
    test = set(np.random.default_rng(0).choice(ids, size=len(ids) * 3 // 10, replace=False).tolist())
    (out / "Watch").mkdir(parents=True, exist_ok=True)
    head = ("@problemName Watch\n@timeStamps false\n@univariate false\n@dimensions 6\n@equalLength false\n"
            "@classLabel true " + " ".join(map(str, range(int(ys.max()) + 1))) + "\n@data\n")
    for part, keep in (("TRAIN", lambda s: s not in test), ("TEST", lambda s: s in test)):
        rows = [":".join(",".join(f"{v:.5g}" for v in xs[i][:, c]) for c in range(xs[i].shape[1])) + f":{ys[i]}"
                for i in range(len(xs)) if keep(subjects[i])]
        (out / "Watch" / f"Watch_{part}.ts").write_text(head + "\n".join(rows) + "\n")


def write_raw(out: Path, ucr: Path, names: tuple[str, ...] = ("GunPoint", "ArrowHead")) -> None:
    rng = np.random.default_rng(3)
    for name in names:
        (out / f"{name}Raw").mkdir(parents=True, exist_ok=True)
        for part in ("TRAIN", "TEST"):
            lines = (ucr / name / f"{name}_{part}.ts").read_text().splitlines()
            start = next(i for i, line in enumerate(lines) if line.strip().lower() == "@data")
            rows = []
            for line in lines[start + 1:]:
                if not line.strip():
                    continue
                *dims, label = line.split(":")
                offset, gain = rng.normal(0, 3.0), np.exp(rng.uniform(np.log(0.3), np.log(3)))
                rows.append(":".join([",".join(f"{float(v) * gain + offset:.5f}" for v in d.split(","))
                                      for d in dims] + [label]))
            head = [f"@problemName {name}Raw" if h.lower().startswith("@problemname") else h for h in lines[:start + 1]]
            (out / f"{name}Raw" / f"{name}Raw_{part}.ts").write_text("\n".join(head + rows) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", type=Path, help="folder to write <Name>/<Name>_TRAIN/_TEST files into")
    ap.add_argument("--watch-npy", type=Path, help="seglearn's watch_dataset.npy: also write Watch")
    ap.add_argument("--raw-from", type=Path, metavar="UCR_DIR",
                    help="a folder with GunPoint/ and ArrowHead/ .ts files: also write GunPointRaw and ArrowHeadRaw")
    args = ap.parse_args()
    write_tsv(args.dir, "SynthCBF", cbf, 30, 900, seed=1)
    write_tsv(args.dir, "SynthControl", control, 300, 300, seed=2)
    write_many_few(args.dir, "ManyFew", 40, 4, 10, 128, seed=7)
    write_many_few(args.dir, "ManyFewB", 25, 6, 10, 200, seed=11)
    if args.watch_npy:
        write_watch(args.dir, args.watch_npy)
    if args.raw_from:
        write_raw(args.dir, args.raw_from)
    print(f"wrote {', '.join(sorted(p.name for p in args.dir.iterdir() if p.is_dir()))} under {args.dir}")


if __name__ == "__main__":
    main()
