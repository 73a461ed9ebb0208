"""`cycle-optuna` command line: parse, call the package, print with rich."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path
from typing import Callable, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cycle_optuna.errors import CycleOptunaError

out = Console()
err = Console(stderr=True)

EXAMPLES = {
    "run": """examples:
  cycle-optuna run studies/quick.toml
  cycle-optuna run studies/seed.toml --n-trials 30
  cycle-optuna run studies/seed.toml --workers 4
  cycle-optuna run studies/seed.toml --storage postgresql+psycopg://user:pass@db/optuna""",
    "worker": """examples:
  cycle-optuna worker studies/seed.toml
  CYCLE_OPTUNA_STORAGE=postgresql+psycopg://user:pass@db/optuna cycle-optuna worker studies/seed.toml""",
    "status": """examples:
  cycle-optuna status studies/seed.toml
  cycle-optuna status studies/seed.toml --storage postgresql+psycopg://user:pass@db/optuna""",
    "best": """examples:
  cycle-optuna best studies/seed.toml
  cycle-optuna best studies/seed.toml --json""",
    "report": """examples:
  cycle-optuna report studies/seed.toml
  cycle-optuna report studies/seed.toml -o reports/seed""",
    "dashboard": """examples:
  cycle-optuna dashboard studies/seed.toml
  cycle-optuna dashboard studies/seed.toml --port 8081
  cycle-optuna dashboard studies/seed.toml --host 0.0.0.0   # no authentication: trusted networks only""",
}


def _load(args: argparse.Namespace):
    """The study file with command-line overrides, and its storage URL."""
    from cycle_optuna import config, storage

    cfg = config.override(config.load(args.study), n_trials=getattr(args, "n_trials", None))
    return cfg, storage.resolve_url(cfg, args.storage)


def cmd_run(args: argparse.Namespace) -> int:
    from cycle_optuna import storage, worker

    cfg, url = _load(args)
    out.print(f"study [bold]{cfg.study.name}[/] on {storage.mask(url)}: "
              f"{cfg.study.n_trials} trials, sampler {cfg.sampler.type}, pruner {cfg.pruner.type}")
    worker.install_signal_handlers()
    if args.workers > 1:
        return _run_workers(args, cfg, url)
    stats = worker.WorkerStats()
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[info]}"))
    with Progress(*columns, console=out, transient=False) as progress:
        trials = progress.add_task("trials", total=cfg.study.n_trials, info="")
        epochs = progress.add_task("epochs", total=cfg.train.epochs, info="")

        def on_trial_start(done: int) -> None:
            progress.update(trials, completed=done)
            progress.reset(epochs, total=cfg.train.epochs)

        def on_epoch(trial, m) -> None:
            progress.update(epochs, completed=m.epoch + 1, description=f"cycle {trial.number + 1}",
                            info=f"val loss {m.val_loss:.4f}  acc {m.val_accuracy:.1%}")

        def on_trial_end(study, t) -> None:
            progress.update(trials, completed=worker.trials_counted(study), info=_trial_line(t))

        hooks = worker.Hooks(on_trial_start=on_trial_start, on_epoch=on_epoch, on_trial_end=on_trial_end)
        try:
            study = worker.run_worker(cfg, url, hooks=hooks, stats=stats)
        except KeyboardInterrupt:
            err.print(f"interrupted: {stats.summary()}")
            return worker.interrupt_exit_code()
        progress.update(trials, completed=worker.trials_counted(study))
    _print_cycles(study)
    if not stats.states:
        out.print(f"the study already holds {worker.trials_counted(study)} of {cfg.study.n_trials} trials; "
                  "pass a larger total with --n-trials N to grow it")
    return 0


def _run_workers(args: argparse.Namespace, cfg, url: str) -> int:
    """`run --workers K`: K local worker processes, one combined view polled from the storage."""
    import signal

    from cycle_optuna import config, status, worker

    study = worker.open_study(cfg, url)  # created once here, so the children do not race to create it
    prefix = str(config.study_dir(cfg) / cfg.study.name)
    procs = worker.start_local_workers(cfg.path, url, args.workers, n_trials=args.n_trials, log_prefix=prefix)
    try:
        status.watch(study, cfg.study.n_trials, procs, epochs=cfg.train.epochs, console=out)
    except KeyboardInterrupt:
        for p, _ in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p, _ in procs:
            p.wait()
        err.print(f"interrupted: {args.workers} workers stopped; their running trials were handed back for retry")
        return worker.interrupt_exit_code()
    failed = [(p.returncode, log) for p, log in procs if p.returncode != 0]
    for code, log in failed:
        lines = [line for line in Path(log).read_text().splitlines() if line.strip()]
        err.print(f"a worker exited with code {code}: {lines[-1] if lines else ''} (log: {log})",
                  highlight=False, soft_wrap=True)
    if failed:
        return failed[0][0] if failed[0][0] > 0 else 1
    _print_cycles(study)
    return 0


def _trial_line(t) -> str:
    value = "-" if t.value is None else f"{t.value:.4f}"
    return f"last: cycle {t.number + 1} {t.state.name.lower()} {value}"


def _print_cycles(study) -> None:
    from cycle_optuna.api import cycles

    table = Table(title=f"cycles of {study.study_name}")
    for col in ("cycle", "val loss", "accuracy", "improvement", "state", "changes"):
        table.add_column(col, justify="right" if col not in ("state", "changes") else "left")
    for c in cycles(study):
        table.add_row(
            str(c.cycle),
            "-" if c.value is None else f"{c.value:.4f}",
            "-" if c.val_accuracy is None else f"{c.val_accuracy:.2%}",
            "-" if c.improvement_pct is None else f"{c.improvement_pct:.2f}%",
            c.state.lower(),
            c.key_change,
        )
    out.print(table)


def cmd_worker(args: argparse.Namespace) -> int:
    from cycle_optuna import storage, worker

    cfg, url = _load(args)
    worker.install_signal_handlers()
    err.print(f"worker on study {cfg.study.name} at {storage.mask(url)}")
    stats = worker.WorkerStats()
    try:
        study = worker.run_worker(cfg, url, stats=stats)
    except KeyboardInterrupt:
        err.print(f"interrupted: {stats.summary()}")
        return worker.interrupt_exit_code()
    err.print(stats.summary())
    err.print(f"study {cfg.study.name}: {worker.trials_counted(study)} of {cfg.study.n_trials} trials")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from cycle_optuna import status

    cfg, url = _load(args)
    out.print(status.render(status.collect(status.load(cfg, url), cfg.study.n_trials), epochs=cfg.train.epochs))
    return 0


def cmd_best(args: argparse.Namespace) -> int:
    import json

    from cycle_optuna import api

    cfg, url = _load(args)
    rec = api.best_record(args.study, storage=url, with_test=not args.no_test)
    if args.json:  # field names of `optuna best-trial -f json`, plus cycle, hyperparams, test metrics
        out.print_json(json.dumps(rec, default=str))
        return 0
    attrs = rec["user_attrs"]
    table = Table(title=f"best of {cfg.study.name}: cycle {rec['cycle']} (trial {rec['number']})")
    table.add_column("name")
    table.add_column("value", justify="right")
    table.add_row("val loss", f"{rec['value']:.4f}")
    if attrs.get("val_accuracy") is not None:
        table.add_row("val accuracy", f"{attrs['val_accuracy']:.2%}")
    if rec.get("test_accuracy") is not None:
        table.add_row("test accuracy (held out)", f"{rec['test_accuracy']:.2%}")
        table.add_row("test loss (held out)", f"{rec['test_loss']:.4f}")
    elif not args.no_test:
        table.add_row("test accuracy (held out)", f"unavailable: {rec.get('test_error')}")
    table.add_section()
    for k, v in rec["hyperparams"].items():
        table.add_row(k if k in rec["params"] else f"{k} (fixed)", f"{v:.4g}" if isinstance(v, float) else str(v))
    table.add_section()
    for k in ("diagnosis", "epochs_run", "n_params", "improvement_pct", "train_seconds"):
        if attrs.get(k) is not None:
            table.add_row(k, str(attrs[k]))
    table.add_row("duration", str(rec["duration"]))
    out.print(table)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from cycle_optuna import report

    cfg, url = _load(args)
    path = report.write_report(args.study, args.output, storage=url, test=not args.no_test)
    plots = sorted(p.name for p in path.parent.glob("*.png"))
    out.print(f"report of study [bold]{cfg.study.name}[/]: {path} with {len(plots)} plots ({', '.join(plots)})",
              highlight=False, soft_wrap=True)
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from cycle_optuna import dashboard

    _load(args)  # validates the study file first: a bad file is one clear line, not a traceback
    return dashboard.launch(
        args.study, host=args.host, port=args.port, storage=args.storage,
        echo=lambda line: out.print(line, highlight=False, soft_wrap=True),
        warn=lambda line: err.print(f"[bold yellow]{line}[/]", highlight=False, soft_wrap=True),
    )


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a port number 0-65535, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0-65535, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cycle-optuna",
        description="Tune small transformers in improvement cycles with Optuna.",
        epilog="Run 'cycle-optuna COMMAND --help' for a command's options and examples.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, func: Callable, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, epilog=EXAMPLES.get(name),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.add_argument("study", metavar="STUDY.toml", help="the study file")
        p.add_argument("--storage", metavar="URL",
                       help="storage URL (default: $CYCLE_OPTUNA_STORAGE, the study file, or sqlite beside it)")
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show tracebacks of unexpected errors")
        p.set_defaults(func=func)
        return p

    run = command("run", cmd_run, "run the study's trials with progress, then print the cycle table")
    run.add_argument("--n-trials", type=_positive, metavar="N", help="total trials the study should hold")
    run.add_argument("--workers", type=_positive, metavar="K", default=1,
                     help="local worker processes sharing the study (default 1, in this process)")
    wk = command("worker", cmd_worker, "run one worker on the study (start several, on many machines)")
    wk.add_argument("--n-trials", type=_positive, metavar="N", help="total trials the study should hold")
    command("status", cmd_status, "trials by state, running trials with their workers, best so far")
    best = command("best", cmd_best, "print the best trial's parameters and metrics")
    best.add_argument("--json", action="store_true", help="machine-readable output (optuna best-trial's field names)")
    best.add_argument("--no-test", action="store_true", help="skip the held-out test evaluation of the best model")
    rep = command("report", cmd_report, "write report.md and PNG plots of the study's cycles")
    rep.add_argument("-o", "--output", metavar="DIR",
                     help="output directory (default: <study name>-report beside the study file)")
    rep.add_argument("--no-test", action="store_true", help="skip the held-out test evaluation of the best model")
    dash = command("dashboard", cmd_dashboard, "serve optuna-dashboard on the study's storage and artifacts")
    dash.add_argument("--host", default="127.0.0.1",
                      help="address to bind (default 127.0.0.1; optuna-dashboard has no authentication)")
    dash.add_argument("--port", type=_port, default=8080, help="port (default 8080; 0 picks a free one)")
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns 0 ok, 2 bad input, 1 unexpected error, 130 interrupted."""
    args = build_parser().parse_args(argv)
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    logging.captureWarnings(True)
    from cycle_optuna.storage import mask

    try:
        return args.func(args)
    except CycleOptunaError as e:
        err.print(f"[bold red]error:[/] {mask(str(e))}", highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except Exception as e:  # noqa: BLE001 - the boundary that turns surprises into exit code 1
        if args.debug:
            raise
        err.print(f"[bold red]unexpected error:[/] {mask(f'{type(e).__name__}: {e}')} (rerun with --debug for the traceback)",
                  highlight=False, soft_wrap=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
