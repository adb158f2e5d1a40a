"""`python -m benchmark <command>` / `tumorbench <command>`."""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from . import intake, quiet, redact
from .config import ConfigError, load_config

# What can go wrong before or during a run that the user can fix: one clear line, exit code 1.
USER_ERRORS = (ConfigError, intake.DataError, KeyError, ImportError)


def _config(args):
    overrides = list(args.set or [])
    if getattr(args, "backbones", None):
        overrides.append(f"model.backbones={args.backbones}")
    if getattr(args, "data", None):
        overrides.append(f'data.path="{args.data}"')
    if getattr(args, "folds", None):
        overrides.append(f"data.folds={args.folds}")
    if getattr(args, "weights", None):
        overrides.append(f'model.weights="{args.weights}"')
        overrides.append('model.weights_fallback=""')  # weights asked for by name must not be swapped
    return load_config(args.config, overrides)


def _bench(args) -> int:
    from backbones import WeightsUnavailable

    from . import bench, report, stopwatch
    from .tracking import TrackingUnavailable
    from .trainer import TrainingFailed

    try:
        with stopwatch.running(stopwatch.Stopwatch()) as watch:
            table, paths, name = bench.run(_config(args))
    except (*USER_ERRORS, WeightsUnavailable, TrackingUnavailable, TrainingFailed) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    source = "cv" if "folds" in table.columns else "bench"
    print(f"\n{name}: validation scores" + (" (mean [95% CI] over folds)" if source == "cv" else ""))
    print(report.terminal(table, source))
    print(f"full table (per-class scores, calibration, paired comparisons): {paths['md']}")
    print(f"written: {', '.join(str(p) for p in paths.values())}")
    print(watch.line())  # where the time went: a slow run explains itself
    return 0


def _sweep(args) -> int:
    from backbones import WeightsUnavailable

    from . import sweep
    from .tracking import TrackingUnavailable

    extra = [f"sweep.trials={args.trials}"] if args.trials else []
    extra += [f'sweep.storage="{args.storage}"'] if args.storage else []
    args.set = [*(args.set or []), *extra]
    try:
        sweep.run(_config(args), worker=args.worker, workers=args.workers)
    except (*USER_ERRORS, WeightsUnavailable, TrackingUnavailable, sweep.ConfigurationError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def _predict(args) -> int:
    from . import modelfile, predict, tracking

    try:
        config = load_config(args.config, list(args.set or []))
        model_paths = predict.resolve_models(args.model, config.tracking)
        rows = predict.run(model_paths, args.paths, args.batch_size, args.tta, args.threshold,
                           Path(args.explain) if args.explain else None)
        class_names = [k.removeprefix("prob_") for k in rows[0] if k.startswith("prob_")] if rows else []
        scored = predict.score(rows, args.paths, class_names) if args.score else None
    except (*USER_ERRORS, modelfile.ModelFileError, tracking.TrackingUnavailable, LookupError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if args.out:
        predict.write(rows, Path(args.out))
        print(f"written: {args.out} ({len(rows)} rows)")
    else:
        for row in rows:
            probs = " ".join(f"{k.removeprefix('prob_')}={v:.4f}" for k, v in row.items()
                             if k.startswith("prob_") and v != "")
            note = f"\tnote: {row['note']}" if row["note"] else ""
            print(f"{row['path']}\t{row['predicted'] or 'ERROR'}\t{probs or row['error']}{note}")
    if scored:
        from .metrics import report_text
        print(f"scored {sum(r['support'] for r in scored['per_class'].values())} images against their class folders "
              f"({len(model_paths)} model(s){', TTA' if args.tta else ''}): accuracy {scored['accuracy']:.4f}, "
              f"macro-F1 {scored['macro_f1']:.4f}, ROC-AUC {scored['roc_auc']:.4f}")
        print(report_text(scored, class_names))
    errors = [row for row in rows if row["error"]]
    for row in errors:
        print(f"error: {row['path']}: {row['error']}", file=sys.stderr)
    return 2 if errors else 0


def _perf(args) -> int:
    from . import perf

    if args.memory:
        text, default_out = perf.memory(args.memory), "results/perf-memory.md"
    elif args.yes_no:
        text = perf.yes_no_run(quick=args.quick, data=args.data or "", weights=args.weights, trials=args.trials)
        default_out = "results/perf-yes-no.md"
    else:
        text, default_out = perf.run(data=args.data or "", config_file=args.config, quick=args.quick), "results/perf.md"
    print("\n" + text)
    if not args.quick:
        out = Path(args.out or default_out)
        out.write_text(text)
        print(f"written: {out}")
    return 0


def _report(args) -> int:
    from . import recipe, report, tracking

    try:
        config = _config(args)
        client = tracking.connect(config.tracking)
        name = args.dataset or recipe.dataset_name(config)
        only = [run_id.strip() for run_id in (args.runs or "").split(",") if run_id.strip()]
        runs = report.select_runs(client, name, args.source, only=only)
        _, paths = report.build(client, name, runs, Path(config.tracking.results_dir), args.source,
                                config.evaluate.bootstrap_resamples,
                                register=args.source != "sweep")  # sweep trials keep no model
    except (*USER_ERRORS, tracking.TrackingUnavailable, LookupError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(paths["md"].read_text())
    print(f"written: {', '.join(str(p) for p in paths.values())}")
    return 0


def _ui(args) -> int:
    """Print each data set's runs-table address, then serve the MLflow UI on the local store (a
    tracking server already serves its own UI: only the addresses are printed)."""
    from . import tracking

    try:
        config = load_config(args.config, list(args.set or []))
        client = tracking.connect(config.tracking)
    except (ConfigError, tracking.TrackingUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    uri = tracking.tracking_uri(config.tracking)
    remote = uri.startswith(("http://", "https://"))
    links = tracking.runs_table_links(client, uri if remote else f"http://{args.host}:{args.port}")
    print("runs of each data set (the Model training view):" if links else "no tumorbench runs in this store yet")
    for name, link in links.items():
        print(f"  {name}: {redact.mask(link)}")
    if remote:
        return 0
    sys.stdout.flush()
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    os.execv(mlflow, [mlflow, "ui", "--host", args.host, "--port", str(args.port), "--backend-store-uri", uri])


def _leaderboard(args) -> int:
    from . import leaderboard

    try:
        written = leaderboard.write(Path(args.results), Path(args.readme))
    except (OSError, LookupError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"written: {', '.join(str(p) for p in written)}")
    return 0


def _audit(args) -> int:
    from . import audit

    try:
        config = load_config(args.config, list(args.set or []))
        dataset = intake.load_dataset(args.data, config.data.class_names, skip_bad=args.skip_bad)
        distance = args.distance if args.distance is not None else config.data.duplicate_distance
        other = intake.load_dataset(args.against, skip_bad=args.skip_bad) if args.against else None
        found = audit.run(dataset, distance) if other is None else audit.copies_in(dataset, other, distance)
    except (ConfigError, intake.DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    out_dir = Path(args.out or Path(config.tracking.results_dir) / dataset.name)
    if other is None:
        paths, text = audit.write(found, out_dir), found.markdown()
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {"md": out_dir / f"copies-in-{other.name}.md", "csv": out_dir / f"copies-in-{other.name}.csv"}
        text = audit.copies_markdown(found, dataset, other, distance)
        paths["md"].write_text(text)
        found.to_csv(paths["csv"], index=False)
    print(text)
    print(f"written: {', '.join(str(p) for p in paths.values())}")
    return 0


def _check_data(args) -> int:
    try:
        dataset = intake.load_dataset(args.data, skip_bad=args.skip_bad)
    except intake.DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"data set:    {dataset.name}")
    print(f"root:        {dataset.root}")
    print(f"layout:      {dataset.layout}")
    print(f"fingerprint: {dataset.fingerprint}")
    print(f"classes:     {len(dataset.class_names)} ({', '.join(dataset.class_names)}; index = position)")
    for split_name, samples in dataset.splits.items():
        counts = ", ".join(f"{name} {n}" for name, n in dataset.counts(split_name).items())
        print(f"  {split_name:<6} {len(samples):>6} images: {counts}")
    sizes = ", ".join(f"{w}x{h} ({n})" for (w, h), n in dataset.sizes.most_common(5))
    more = f" and {len(dataset.sizes) - 5} more" if len(dataset.sizes) > 5 else ""
    print(f"sizes:       {len(dataset.sizes)} distinct: {sizes}{more}")
    print(f"modes:       {', '.join(f'{m} ({n})' for m, n in dataset.modes.most_common())}")
    print(f"problems:    {len(dataset.skipped)} bad file(s) skipped, {len(dataset.ignored)} non-image file(s) ignored, "
          f"{len(dataset.not_followed)} folder link(s) out of the data folder not followed")
    for problem in dataset.skipped + dataset.not_followed:
        print(f"  skipped {problem}")
    for path in dataset.ignored:
        print(f"  ignored {path}: not an image file extension")
    print(f"notes:       {len(dataset.notes)} on usable images")
    for note in dataset.notes:
        print(f"  note {note}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tumorbench", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show TensorFlow's own start-up and device lines (hidden by default)")
    commands = parser.add_subparsers(dest="command", required=True)

    check = commands.add_parser("check-data", help="read a data set and report its layout and problems")
    check.add_argument("data", help="folder of class folders (or splits), or an .npz file")
    check.add_argument("--skip-bad", action="store_true", help="leave unreadable files out instead of failing")
    check.set_defaults(run=_check_data)

    audit_cmd = commands.add_parser("audit", help="find exact and near-duplicate images across classes and splits")
    audit_cmd.add_argument("data", help="folder of class folders (or splits), or an .npz file")
    audit_cmd.add_argument("--distance", type=int, help="near duplicate: hashes at most this many bits apart "
                           "(of 256; default data.duplicate_distance)")
    audit_cmd.add_argument("--out", help="folder for audit.md, duplicates.csv/png (default results/<data set>)")
    audit_cmd.add_argument("--against", metavar="OTHER", help="instead: which images of DATA have a copy in "
                           "OTHER (e.g. a test set against a training set): copies-in-<other>.md/.csv")
    audit_cmd.add_argument("--skip-bad", action="store_true", help="leave unreadable files out instead of failing")
    audit_cmd.add_argument("--config", help="TOML file overriding the defaults")
    audit_cmd.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE")
    audit_cmd.set_defaults(run=_audit)

    def common(sub):
        sub.add_argument("--config", help="TOML file overriding the defaults")
        sub.add_argument("--data", help="data set path (default: the embedded phantom set)")
        sub.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                         help="override one config value, e.g. train.lr1=3e-4 (repeatable)")

    bench_cmd = commands.add_parser("bench", help="train every backbone two-phase, log to MLflow, write the table")
    common(bench_cmd)
    bench_cmd.add_argument("--backbones", help="comma-separated names (default: all in the config)")
    bench_cmd.add_argument("--weights", help="imagenet | none | hed | path to a weights file")
    bench_cmd.add_argument("--folds", type=int, help="k-fold cross-validation (mean and 95%% CI per metric)")
    bench_cmd.set_defaults(run=_bench)

    sweep_cmd = commands.add_parser("sweep", help="Optuna study per backbone over lr1, lr2, unfreeze, dropout, head")
    common(sweep_cmd)
    sweep_cmd.add_argument("--backbones", help="comma-separated names (default: all in the config)")
    sweep_cmd.add_argument("--weights", help="imagenet | none | hed | path to a weights file")
    sweep_cmd.add_argument("--trials", type=int, help="finished trials each study should reach")
    sweep_cmd.add_argument("--storage", help="Optuna storage URL (default: sqlite file in results/)")
    sweep_cmd.add_argument("--worker", type=int, default=0, help="this worker's index (seeds its sampler)")
    sweep_cmd.add_argument("--workers", type=int, default=1, help="how many workers share the study")
    sweep_cmd.set_defaults(run=_sweep)

    predict_cmd = commands.add_parser("predict", help="classify images with a trained model")
    predict_cmd.add_argument("model", help="a .keras file from bench, an MLflow run id (a cross-validated "
                             "run: its fold models as an ensemble), models:/<name>@<alias> or best:<data set>; "
                             "several joined by commas are one ensemble")
    predict_cmd.add_argument("paths", nargs="+", help="image files and/or folders (searched recursively)")
    predict_cmd.add_argument("--out", help="write rows to a .csv or .json file")
    predict_cmd.add_argument("--tta", action="store_true", help="average over the original and its horizontal flip")
    predict_cmd.add_argument("--score", action="store_true", help="the images sit in folders named after the "
                             "model's classes (a held-out test split): print accuracy (most probable class), "
                             "macro-F1, per-class figures")
    predict_cmd.add_argument("--threshold", type=float, help="2-class models: probability of the second class "
                             "needed to predict it (default: the model's own, else 0.5)")
    predict_cmd.add_argument("--explain", metavar="DIR", help="write a Grad-CAM overlay PNG per image into DIR")
    predict_cmd.add_argument("--batch-size", type=int, default=32)
    predict_cmd.add_argument("--config", help="TOML config (for the MLflow tracking store)")
    predict_cmd.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE")
    predict_cmd.set_defaults(run=_predict)

    perf_cmd = commands.add_parser("perf", help="time a whole run stage by stage, cold and warm, against the "
                                                "seeds' pipeline (results/perf.md)")
    perf_cmd.add_argument("--quick", action="store_true", help="small phantom run for a smoke check (writes nothing)")
    perf_cmd.add_argument("--config", default="configs/four-class-fast.toml", help="the recipe to time")
    perf_cmd.add_argument("--data", help="data set (default: the config's; with --yes-no "
                                         "../shared/datasets/brain-mri-yes-no)")
    perf_cmd.add_argument("--yes-no", action="store_true", help="instead: vgg16 on the yes/no set, cached views "
                          "against the seeds' way in one process, a sweep, inference (results/perf-yes-no.md)")
    perf_cmd.add_argument("--weights", default="none", help="with --yes-no: weights for both sides (default none)")
    perf_cmd.add_argument("--trials", type=int, default=0, help="with --yes-no: sweep trials to time (default 20)")
    perf_cmd.add_argument("--memory", metavar="DATA", help="instead: peak memory of a 224 px bench of DATA "
                          "(efficientnet_lite0, configs/experiments/four-class-cv.toml on one split), written to "
                          "results/perf-memory.md")
    perf_cmd.add_argument("--out", help="default results/perf.md (--memory: results/perf-memory.md, --yes-no: "
                                        "results/perf-yes-no.md)")
    perf_cmd.set_defaults(run=_perf)

    report_cmd = commands.add_parser("report", help="rebuild the comparison table from MLflow alone")
    common(report_cmd)
    report_cmd.add_argument("--dataset", help="experiment name (default: derived from --data or the config)")
    report_cmd.add_argument("--source", default="bench", choices=["bench", "cv", "sweep"],
                            help="bench: newest bench run per backbone; cv: newest cross-validated one; "
                            "sweep: best sweep trial per backbone")
    report_cmd.add_argument("--runs", metavar="ID[,ID...]", help="table exactly these runs instead of the newest "
                            "(cv: the parents); one backbone's runs more than once compares their recipes")
    report_cmd.set_defaults(run=_report)

    ui = commands.add_parser("ui", help="the MLflow UI on the local store, with each data set's runs-table address")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--config", help="TOML config (for the MLflow tracking store)")
    ui.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE")
    ui.set_defaults(run=_ui)

    board = commands.add_parser("leaderboard", help="results/README.md and the README's leaderboard from the "
                                "committed comparison.csv files (results/leaderboard.toml lists the rows)")
    board.add_argument("--results", default="results", help="the results folder (default results)")
    board.add_argument("--readme", default="README.md", help="the README whose leaderboard section to update")
    board.set_defaults(run=_leaderboard)
    return parser


def stop_as_interrupted(signum, frame):
    """`kill` (SIGTERM) ends a command the way Ctrl-C does: the open MLflow runs unwind and are marked
    FAILED instead of showing RUNNING in the UI forever, and a resumed CV retrains only that fold."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    redact.mask_output()  # before argparse: its own error lines can quote a URL
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, stop_as_interrupted)
    # TensorFlow's and MLflow's chatter hides the progress lines
    if args.command not in ("check-data", "audit", "leaderboard"):
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        if not args.verbose:
            os.environ["TUMORBENCH_QUIET_TF"] = "1"  # inherited by sweep's trial processes
        quiet.import_tensorflow(verbose=args.verbose)
    return args.run(args)
