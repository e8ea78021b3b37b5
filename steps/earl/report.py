"""The ``report`` step: the paper's tables and figures rebuilt from every evaluation, beside the paper's numbers.

    python -m earl.report build --config config/config.yaml --out results/report    every evaluation of a config
    python -m earl.report paper --out DIR                                            the paper's Tables 2, 3, 7 alone
    python -m earl.report figure --table results/report/table2.csv --out table2.png  re-draw Table 2's figure

``build`` reads each ``Paths.evaluate(experiment, benchmark)`` (``metrics.json``, ``samples.parquet``) and the
training curves of every SFT stage and RL run, and writes into ``results/report/`` (rebuilt as a whole):

    index.md                     the headline paired deltas, then every table below in Markdown
    table2.{csv,md,html}         Table 2 analogue: mean VIEScore [95 % CI] per experiment and benchmark, + AVG,
    table2_wide.csv, table2.png  with the paper's number beside it where config/reference has the row and column
    deltas.{csv,md,html}         RL experiment minus its SFT start, paired on (id, sample), 95 % bootstrap CI
    by_task.{csv,md,html}        per-task scores (metrics.json's by_task)
    breakdown.{csv,md,html}      Table 7 analogue: SC, PQ and the VIEScore sub-scores, beside Table 7's numbers
    sft_curves.png, rl_curves.png, samples_<benchmark>.png

Tables are pure functions of their inputs (same inputs, same bytes), and figures are saved without dates or
software versions, so re-drawing the same data gives the same PNG bytes on the same matplotlib.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless, and the only backend whose PNG bytes are reproducible
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from PIL import Image

from earl import artifacts, stats
from earl.cli_util import run_step
from earl.config import Config
from earl.sources import DataError

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "config" / "reference"
AVG = "AVG"
SCORE_AXIS = "VIEScore (0–10)"
SCORE_METRICS = ("overall", "sc", "pq")
SUBSCORES = ("edit_success", "overedit", "looks_natural", "no_artifact")
METRIC_NAMES = {"overall": "VIEScore", "sc": "SC", "pq": "PQ", "edit_success": "Edit Success",
                "overedit": "OverEdit", "looks_natural": "Looks Natural", "no_artifact": "No Artifact"}
METRICS_KEYS = ("benchmark", "rows", "n", "judge_failures", "well_formed", "by_task", *SCORE_METRICS)
SAMPLES_COLUMNS = ("id", "sample", "task", "instruction", "failed", "overall", "image", "source_image", "target_image")
GRID_ROWS = 6
DPI = 100
PNG_METADATA = {"Software": None}  # no version string, and Agg writes no date: same data, same bytes
TABLE2_TITLE = "Mean VIEScore per benchmark (Table 2 analogue)"


# ------------------------------------------------------------------------------------------ formatting


def fmt(value: float, digits: int = 2, sign: bool = False) -> str:
    """A number as the tables print it; a missing one as an en dash, never 'nan'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def fmt_ci(record: dict, sign: bool = False) -> str:
    """``mean [low, high]``, or the bare mean where there is no interval (the AVG column, one sample)."""
    mean = fmt(record["mean"], sign=sign)
    if math.isnan(record.get("ci_low", math.nan)):
        return mean
    return f"{mean} [{fmt(record['ci_low'], sign=sign)}, {fmt(record['ci_high'], sign=sign)}]"


def cells_table(tidy: pd.DataFrame, index: list[str], column: str, sign: bool = False) -> pd.DataFrame:
    """Pivot a tidy score table to display strings, keeping first-appearance order of rows and columns (pandas'
    pivot sorts them), with a ``<column> (paper)`` column after every column that has a paper number."""
    columns = list(dict.fromkeys(tidy[column]))
    with_paper = set(tidy.loc[tidy["paper"].notna(), column]) if "paper" in tidy else set()
    records = {}
    for record in tidy.to_dict("records"):
        key = tuple(record[i] for i in index)
        row = records.setdefault(key, {**dict(zip(index, key)), **{c: "–" for c in columns}})
        row[record[column]] = fmt_ci(record, sign)
        if record[column] in with_paper:
            row[f"{record[column]} (paper)"] = fmt(record["paper"], sign=sign)
    order = [*index, *(name for c in columns for name in ([c, f"{c} (paper)"] if c in with_paper else [c]))]
    return pd.DataFrame(list(records.values())).reindex(columns=order).fillna("–")


def markdown(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table (written here: pandas' ``to_markdown`` needs tabulate, not a pinned dependency)."""
    def line(cells) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(frame.columns), line(["---"] * len(frame.columns)), *map(line, frame.to_numpy())]) + "\n"


def write_tables(directory: Path, stem: str, tidy: pd.DataFrame, display: pd.DataFrame) -> None:
    """``stem.csv`` (tidy, full precision: reading it back gives the inputs), ``stem.md`` and ``stem.html``."""
    artifacts.write_text_atomic(directory / f"{stem}.csv", tidy.to_csv(index=False, lineterminator="\n"))
    artifacts.write_text_atomic(directory / f"{stem}.md", markdown(display))
    artifacts.write_text_atomic(directory / f"{stem}.html", display.to_html(index=False, border=0) + "\n")


# ------------------------------------------------------------------------------------------ reference


def read_reference(name: str, directory: Path = REFERENCE_DIR) -> pd.DataFrame:
    """One of the paper's tables (``config/reference/<name>.csv``), tidy: row, [metric,] column, value."""
    path = Path(directory) / f"{name}.csv"
    try:
        frame = pd.read_csv(path, dtype={"row": str, "column": str}, keep_default_na=False, na_values=[""])
    except (OSError, pd.errors.ParserError) as error:
        raise DataError(f"cannot read reference table {path}: {str(error).splitlines()[0]}") from None
    missing = {"row", "column", "value"} - set(frame.columns)
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
    if not pd.api.types.is_float_dtype(frame["value"]) or frame["value"].isna().any():
        raise DataError(f"{path}: column 'value' must hold a number on every line")
    return frame


def reference_lookup(frame: pd.DataFrame, metric: str | None = None) -> dict[tuple[str, str, str], float]:
    """``(row, column, metric) -> value``; tables without a metric column (2, 3) hold the VIEScore (overall)."""
    metrics = frame["metric"] if "metric" in frame else [metric or "overall"] * len(frame)
    return {(r, c, m): v for r, c, m, v in zip(frame["row"], frame["column"], metrics, frame["value"])}


def paper_delta(table2: pd.DataFrame, after: str = "EARL SFT (S) → RL (S+C)", before: str = "SFT (S)") -> pd.DataFrame:
    """Table 2's last line, Δ EARL − SFT (S), derived from its two rows rather than stored a second time."""
    wide = table2.pivot(index="row", columns="column", values="value")
    columns = list(dict.fromkeys(table2["column"]))
    delta = (wide.loc[after] - wide.loc[before])[columns].round(2)
    return pd.DataFrame({"row": f"Δ {after} − {before}", "column": columns, "mean": delta.to_numpy()})


def paper_scores(frame: pd.DataFrame) -> pd.DataFrame:
    """A reference table in the report's score form (row, column, mean, CI, paper) so one renderer draws both."""
    return pd.DataFrame({"row": frame["row"], "column": frame["column"], "mean": frame["value"],
                         "ci_low": math.nan, "ci_high": math.nan, "paper": math.nan})


def render_paper(out: Path, reference: Path = REFERENCE_DIR) -> None:
    """The paper's Tables 2, 3 and 7 from ``config/reference`` alone: CSV (the reference data as is), Markdown,
    HTML, and Tables 2 and 3 as per-benchmark bar charts."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table2 = read_reference("table2", reference)
    scores2 = paper_scores(table2)
    display2 = cells_table(pd.concat([scores2, paper_delta(table2)], ignore_index=True), ["row"], "column")
    display2.insert(1, "base", display2["row"].map(dict(zip(table2["row"], table2["base"].fillna("–")))).fillna(""))
    write_tables(out, "table2", table2, display2)
    draw_scores(scores2, out / "table2.png", "Paper, Table 2: VIEScore (GPT-4o-mini judge)", "paper")
    table3 = read_reference("table3", reference)
    write_tables(out, "table3", table3, cells_table(paper_scores(table3), ["row"], "column"))
    draw_scores(paper_scores(table3), out / "table3.png", "Paper, Table 3: chain-of-thought variants", "paper")
    table7 = read_reference("table7", reference)
    scores7 = paper_scores(table7).assign(metric=table7["metric"].map(METRIC_NAMES))
    write_tables(out, "table7", table7, cells_table(scores7, ["row", "metric"], "column"))


# --------------------------------------------------------------------------------------------- figures


def save_figure(figure: Figure, path: Path) -> None:
    """PNG without a date or version string, renamed into place only when complete."""
    with artifacts.atomic_file(path) as tmp:
        figure.savefig(tmp, format="png", dpi=DPI, metadata=PNG_METADATA)


def draw_scores(scores: pd.DataFrame, path: Path, title: str, bar_label: str = "this run (95 % CI)") -> None:
    """One panel per benchmark column (and AVG), one horizontal bar per row, 95 % CIs as error bars and the
    paper's number as a marker: long row labels stay readable, and every panel shares the 0–10 scale."""
    rows, columns = list(dict.fromkeys(scores["row"])), list(dict.fromkeys(scores["column"]))
    figure = Figure(figsize=(2.1 * len(columns) + 2.6, 0.32 * len(rows) + 1.9), layout="constrained")
    axes = figure.subplots(1, len(columns), sharey=True, squeeze=False)[0]
    colours = matplotlib.colormaps["tab20"](np.arange(len(rows)) % 20)
    position = {row: i for i, row in enumerate(rows)}
    for ax, column in zip(axes, columns):
        part = scores[scores["column"] == column]
        y = part["row"].map(position).to_numpy()
        ax.barh(y, part["mean"], color=colours[y], height=0.75)
        low, high = (part["mean"] - part["ci_low"]).to_numpy(), (part["ci_high"] - part["mean"]).to_numpy()
        has_ci = ~np.isnan(low)
        if has_ci.any():
            ax.errorbar(part["mean"][has_ci], y[has_ci], xerr=[low[has_ci], high[has_ci]], fmt="none", ecolor="black", capsize=2)
        has_paper = part["paper"].notna().to_numpy()
        if has_paper.any():
            ax.plot(part["paper"][has_paper], y[has_paper], "D", color="black", markersize=5, markerfacecolor="white")
        ax.set_title(column)
        ax.set_xlim(0, 10)
        ax.set_xlabel(SCORE_AXIS)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(rows)), rows)
    axes[0].invert_yaxis()
    handles = [Patch(color="0.6", label=bar_label)]
    if scores["paper"].notna().any():
        handles.append(Line2D([], [], marker="D", color="black", markerfacecolor="white", linestyle="none", label="paper"))
    figure.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    figure.suptitle(title)
    save_figure(figure, path)


def render_table2_figure(table: Path, out: Path) -> None:
    """Table 2's figure from the ``table2.csv`` the report writes: the committed README figure can be re-drawn
    from its committed CSV and compared."""
    frame = read_csv(table)
    missing = {"row", "column", "mean", "ci_low", "ci_high", "paper"} - set(frame.columns)
    if missing:
        raise DataError(f"{table}: missing column(s) {', '.join(sorted(missing))}")
    draw_scores(frame, out, TABLE2_TITLE)


def draw_curves(curves: pd.DataFrame, x: str, panels: dict[str, str], path: Path, title: str) -> None:
    """Training curves: one panel per metric (``panels``: column -> y-axis label), one line per run. Sparse
    series (eval loss, held-out reward) get markers so a handful of points is still visible."""
    figure = Figure(figsize=(4.2 * len(panels), 3.6), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for ax, (metric, ylabel) in zip(axes, panels.items()):
        for run, part in curves.groupby("run", sort=False):
            series = part[[x, metric]].dropna() if metric in part else part.iloc[:0]
            sparse = len(series) < 0.5 * len(part)
            ax.plot(series[x], series[metric], marker="o" if sparse else None, markersize=3, label=run)
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 3), frameon=False)
    figure.suptitle(title)
    save_figure(figure, path)


def show_image(ax, path: Path | None) -> None:
    """An edit at its native size (nearest: the default's 48 px scenes stay sharp); none: a malformed output."""
    if path is None:
        ax.set_facecolor("0.85")
        ax.text(0.5, 0.5, "no image\n(malformed)", ha="center", va="center", fontsize=8, transform=ax.transAxes)
    else:
        try:
            with Image.open(path) as image:
                ax.imshow(np.asarray(image.convert("RGB")), interpolation="nearest")
        except OSError as error:
            raise DataError(f"cannot read image {path}: {error}") from None
    ax.set_xticks([])
    ax.set_yticks([])


def draw_grid(benchmark: str, picks: pd.DataFrame, outputs: dict[str, tuple[Path, pd.DataFrame]], path: Path) -> None:
    """Source | instruction | each experiment's edit | ground truth (when the benchmark has it), one row per pick.

    ``picks`` carries the first experiment's rows (source, target, instruction); ``outputs`` maps each
    experiment's label to its evaluation directory and samples indexed by (id, sample)."""
    first_dir = next(iter(outputs.values()))[0]
    has_target = picks["target_image"].notna().any()
    headers = ["source", "instruction", *outputs, *(["ground truth"] if has_target else [])]
    figure = Figure(figsize=(1.9 * len(headers), 1.9 * len(picks) + 0.6), layout="constrained")
    axes = figure.subplots(len(picks), len(headers), squeeze=False)
    for r, pick in enumerate(picks.to_dict("records")):
        show_image(axes[r, 0], first_dir / pick["source_image"])
        axes[r, 1].axis("off")
        axes[r, 1].text(0.0, 0.5, textwrap.fill(str(pick["instruction"]), 24), va="center", fontsize=8,
                        transform=axes[r, 1].transAxes)
        for c, (directory, samples) in enumerate(outputs.values(), start=2):
            image = samples.loc[(pick["id"], pick["sample"]), "image"]
            show_image(axes[r, c], directory / image if isinstance(image, str) else None)
        if has_target:
            show_image(axes[r, -1], first_dir / pick["target_image"] if isinstance(pick["target_image"], str) else None)
    for c, header in enumerate(headers):
        axes[0, c].set_title(textwrap.fill(header, 22), fontsize=9)
    figure.suptitle(f"{benchmark}: sample edits (seeded choice of rows, sample 0)")
    save_figure(figure, path)


# ------------------------------------------------------------------------------------------- inputs


def read_metrics(directory: Path) -> dict:
    """An evaluation's ``metrics.json``, checked against the evaluate step's contract."""
    path = Path(directory) / "metrics.json"
    if not (Path(directory) / artifacts.MANIFEST).is_file():
        raise DataError(f"{directory}: evaluation missing or unfinished (no {artifacts.MANIFEST}); run the evaluate step")
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DataError(f"cannot read {path}: {str(error).splitlines()[0]}") from None
    for key in METRICS_KEYS:
        if key not in metrics:
            raise DataError(f"{path}: missing key {key!r}")
    for key in (*SCORE_METRICS, *(k for k in SUBSCORES if k in metrics)):
        if not isinstance(metrics[key], dict) or {"mean", "ci_low", "ci_high", "n"} - set(metrics[key]):
            raise DataError(f"{path}: {key!r} must be {{mean, ci_low, ci_high, n}}")
    return metrics


def read_samples(directory: Path) -> pd.DataFrame:
    """An evaluation's ``samples.parquet``, indexed by (id, sample) so two models' edits pair up."""
    path = Path(directory) / "samples.parquet"
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read {path}: {str(error).splitlines()[0]}") from None
    missing = set(SAMPLES_COLUMNS) - set(frame.columns)
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
    frame = frame.astype({"id": str, "sample": int}).set_index(["id", "sample"], drop=False).sort_index()
    if not frame.index.is_unique:
        raise DataError(f"{path}: (id, sample) is not unique")
    return frame


def read_csv(path: Path) -> pd.DataFrame:
    """A CSV input (SFT ``curves.csv``, RL ``metrics.csv``, a report's ``table2.csv``), or one line naming it."""
    try:
        return pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise DataError(f"cannot read {path}: {str(error).splitlines()[0]}") from None


class Run:
    """What the report needs of a config: experiment labels, benchmark columns and their evaluations."""

    def __init__(self, config: Config, reference: Path = REFERENCE_DIR):
        self.config, self.paths = config, artifacts.Paths(config)
        self.table2 = reference_lookup(read_reference("table2", reference))
        self.table7 = reference_lookup(read_reference("table7", reference))
        self.pairs = [(e, b) for e in config.experiments for b in config.benchmarks_of(e)]
        self._metrics = {pair: read_metrics(self.paths.evaluate(*pair)) for pair in self.pairs}
        self._samples: dict[Path, pd.DataFrame] = {}

    def label(self, experiment: str) -> str:
        return self.config.experiments[experiment].label or experiment

    def column(self, benchmark: str) -> str:
        return self.config.benchmarks[benchmark].paper_column or benchmark

    def metrics(self, experiment: str, benchmark: str) -> dict:
        return self._metrics[(experiment, benchmark)]

    def samples(self, experiment: str, benchmark: str) -> pd.DataFrame:
        """Read once: experiments ending in the same model share an evaluation directory."""
        directory = self.paths.evaluate(experiment, benchmark)
        if directory not in self._samples:
            self._samples[directory] = read_samples(directory)
        return self._samples[directory]

    def paper(self, lookup: dict, experiment: str, benchmark: str | None, metric: str = "overall") -> float:
        """The paper's number for this cell, or NaN: AVG only when our columns are exactly the paper's six."""
        if benchmark is None:
            columns = {self.column(b) for b in self.config.benchmarks}
            paper_columns = {c for (_, c, _) in lookup if c != AVG}
            column = AVG if columns == paper_columns else None
        else:
            column = self.config.benchmarks[benchmark].paper_column
        return lookup.get((self.label(experiment), column, metric), math.nan)

    def inputs(self) -> list[Path]:
        """Every directory the report reads: evaluations, each SFT stage, each RL run."""
        dirs = {self.paths.evaluate(*pair) for pair in self.pairs}
        for name, experiment in self.config.experiments.items():
            dirs.update(self.paths.sft(name, s) for s in range(len(experiment.sft)))
            if experiment.rl:
                dirs.add(self.paths.rl(name))
        return sorted(dirs)


# ------------------------------------------------------------------------------------------- tables


def score_record(run: Run, experiment: str, benchmark: str, metric: dict) -> dict:
    return {"experiment": experiment, "row": run.label(experiment), "benchmark": benchmark,
            "column": run.column(benchmark), "mean": metric["mean"], "ci_low": metric["ci_low"],
            "ci_high": metric["ci_high"], "n": metric["n"]}


def with_average(tidy: pd.DataFrame, run: Run, lookup: dict, by: list[str]) -> pd.DataFrame:
    """Append the AVG column, as the paper computes it: the plain mean of the benchmark means, for a group that
    has every benchmark of the table (an average over different benchmarks would not compare). No CI: the
    bootstrap intervals are per benchmark."""
    benchmarks = set(tidy["benchmark"])
    averages = []
    for key, part in tidy.groupby(by, sort=False):
        if set(part["benchmark"]) != benchmarks:
            continue
        record = dict(zip(by, key if isinstance(key, tuple) else (key,)))
        experiment = record["experiment"]
        averages.append({**record, "row": run.label(experiment), "benchmark": AVG, "column": AVG,
                         "mean": part["mean"].mean(), "ci_low": math.nan, "ci_high": math.nan,
                         "n": int(part["n"].sum()),
                         "paper": run.paper(lookup, experiment, None, record.get("metric", "overall"))})
    return pd.concat([tidy, pd.DataFrame(averages)], ignore_index=True) if averages else tidy


def table2(run: Run) -> pd.DataFrame:
    """Mean VIEScore (overall) with its 95 % CI per (experiment, benchmark), counts, and the paper's number."""
    records = []
    for experiment, benchmark in run.pairs:
        metrics = run.metrics(experiment, benchmark)
        records.append({**score_record(run, experiment, benchmark, metrics["overall"]),
                        "rows": metrics["rows"], "judge_failures": metrics["judge_failures"],
                        "well_formed": metrics["well_formed"], "paper": run.paper(run.table2, experiment, benchmark)})
    tidy = with_average(pd.DataFrame(records), run, run.table2, ["experiment"])
    return tidy.astype({"n": int})


def table2_wide(tidy: pd.DataFrame) -> pd.DataFrame:
    """One line per experiment, ``<column> mean/ci_low/ci_high/paper`` side by side (numbers, not strings)."""
    columns = list(dict.fromkeys(tidy["column"]))
    wide = tidy.pivot(index="row", columns="column", values=["mean", "ci_low", "ci_high", "paper"])
    wide = wide.reindex(index=list(dict.fromkeys(tidy["row"])))
    wide = wide[[(value, c) for c in columns for value in ("mean", "ci_low", "ci_high", "paper")]]
    wide.columns = [f"{c} {value}" for value, c in wide.columns]
    return wide.reset_index()


def baseline_of(config: Config, experiment: str) -> str | None:
    """The experiment an RL run started from: the same SFT stages and no RL (None when the config has none)."""
    stages = config.experiments[experiment].sft
    for name, other in config.experiments.items():
        if other.rl is None and other.sft == stages:
            return name
    return None


def paired_overall(after: pd.DataFrame, before: pd.DataFrame) -> pd.DataFrame:
    """Both models' overall score on the (id, sample) pairs they share, judge failures dropped pairwise."""
    joined = after[["failed", "overall"]].join(before[["failed", "overall"]], how="inner", suffixes=("_after", "_before"))
    return joined[~(joined["failed_after"] | joined["failed_before"])]


def deltas(run: Run) -> pd.DataFrame:
    """Each RL experiment minus its SFT start on every shared benchmark: mean paired difference, 95 % CI."""
    records = []
    for experiment, spec in run.config.experiments.items():
        base = baseline_of(run.config, experiment) if spec.rl else None
        if base is None:
            continue
        for benchmark in run.config.benchmarks_of(experiment):
            if benchmark not in run.config.benchmarks_of(base):
                continue
            pairs = paired_overall(run.samples(experiment, benchmark), run.samples(base, benchmark))
            diff = stats.paired_difference(pairs["overall_after"], pairs["overall_before"],
                                           run.config.evaluate.bootstrap_resamples, run.config.evaluate.seed)
            records.append({**score_record(run, experiment, benchmark, diff), "baseline": base,
                            "baseline_row": run.label(base)})
    columns = ["experiment", "row", "baseline", "baseline_row", "benchmark", "column", "mean", "ci_low", "ci_high", "n"]
    return pd.DataFrame(records, columns=columns)


def headline(record: dict) -> str:
    """One sentence per delta; 'beats' only when the whole 95 % interval is above zero."""
    interval = f"{fmt(record['mean'], sign=True)} [{fmt(record['ci_low'], sign=True)}, {fmt(record['ci_high'], sign=True)}]"
    if record["ci_low"] > 0:
        verb = f"beats {record['baseline_row']} by"
    elif record["ci_high"] < 0:
        verb = f"trails {record['baseline_row']} by"
    else:
        verb = f"does not differ clearly from {record['baseline_row']}:"
    return f"{record['row']} {verb} {interval} VIEScore on {record['column']} (95 % CI, {record['n']} paired edits)"


def by_task(run: Run) -> pd.DataFrame:
    """metrics.json's per-task scores, tidy: one line per (experiment, benchmark, task, metric)."""
    records = []
    for experiment, benchmark in run.pairs:
        for task, scores in run.metrics(experiment, benchmark)["by_task"].items():
            for metric in SCORE_METRICS:
                records.append({**score_record(run, experiment, benchmark, scores[metric]), "task": task,
                                "metric": metric, "judge_failures": scores["judge_failures"],
                                "well_formed": scores["well_formed"]})
    return pd.DataFrame(records)


def breakdown(run: Run) -> pd.DataFrame:
    """Table 7 analogue: SC, PQ, the VIEScore sub-scores when the judge gives them, and the overall score."""
    records = []
    for experiment, benchmark in run.pairs:
        metrics = run.metrics(experiment, benchmark)
        for metric in ("sc", "pq", *(s for s in SUBSCORES if s in metrics), "overall"):
            records.append({**score_record(run, experiment, benchmark, metrics[metric]), "metric": metric,
                            "paper": run.paper(run.table7, experiment, benchmark, metric)})
    return with_average(pd.DataFrame(records), run, run.table7, ["experiment", "metric"])


# ------------------------------------------------------------------------------------------- figures of a run


def sft_curves(run: Run) -> pd.DataFrame:
    """Every SFT stage's curves once (stages are shared between experiments), named by an experiment using it,
    preferably the one that ends there."""
    names: dict[Path, str] = {}
    for name, experiment in run.config.experiments.items():
        for stage in range(len(experiment.sft)):
            label = run.label(name) if len(experiment.sft) == 1 else f"{run.label(name)}, stage {stage + 1}"
            path = run.paths.sft(name, stage)
            if path not in names or (experiment.rl is None and len(experiment.sft) == 1):
                names[path] = label
    frames = [read_csv(path / "curves.csv").assign(run=label) for path, label in names.items()]
    return pd.concat(frames, ignore_index=True)


def rl_curves(run: Run) -> pd.DataFrame | None:
    """Every RL run's metrics.csv, named by the experiments that end in it."""
    names: dict[Path, list[str]] = {}
    for name, experiment in run.config.experiments.items():
        if experiment.rl:
            names.setdefault(run.paths.rl(name), []).append(run.label(name))
    if not names:
        return None
    frames = [read_csv(path / "metrics.csv").assign(run=" = ".join(labels)) for path, labels in names.items()]
    return pd.concat(frames, ignore_index=True)


def sample_grids(run: Run, out: Path) -> None:
    """One grid per benchmark: the same seeded rows for every experiment evaluated on it."""
    for benchmark in run.config.benchmarks:
        experiments = [e for e, b in run.pairs if b == benchmark]
        if not experiments:
            continue
        frames = {run.label(e): (run.paths.evaluate(e, benchmark), run.samples(e, benchmark)) for e in experiments}
        first = next(iter(frames.values()))[1]
        keys = first.index[first["sample"] == 0]
        for _, samples in frames.values():
            keys = keys.intersection(samples.index)
        if len(keys) == 0:
            continue
        rng = np.random.default_rng(run.config.evaluate.seed)
        chosen = np.sort(rng.choice(len(keys), size=min(GRID_ROWS, len(keys)), replace=False))
        draw_grid(benchmark, first.loc[keys[chosen]], frames, out / f"samples_{benchmark}.png")


# --------------------------------------------------------------------------------------------- build


def index_markdown(sections: dict[str, pd.DataFrame], sentences: list[str]) -> str:
    """The report's front page: headline deltas, then each table."""
    parts = ["# Report\n\n", "## Headline: RL against its SFT start (paired)\n\n"]
    parts.append("".join(f"- {s}\n" for s in sentences) or "- no RL experiment has its SFT start in this config\n")
    for title, display in sections.items():
        parts += [f"\n## {title}\n\n", markdown(display)]
    parts.append("\nFigures: table2.png, sft_curves.png, rl_curves.png, samples_<benchmark>.png.\n")
    return "".join(parts)


def build(config: Config, out: Path, reference: Path = REFERENCE_DIR) -> None:
    """Every table and figure of a config's evaluations, written to ``out`` as a whole (``out.partial`` first)."""
    run = Run(config, reference)
    out = Path(out)
    shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)  # nothing to resume: rebuild
    with artifacts.artifact_dir(out) as work:
        scores = table2(run)
        display2 = cells_table(scores, ["row"], "column")
        write_tables(work, "table2", scores, display2)
        artifacts.write_text_atomic(work / "table2_wide.csv", table2_wide(scores).to_csv(index=False, lineterminator="\n"))
        render_table2_figure(work / "table2.csv", work / "table2.png")
        delta = deltas(run)
        display_delta = cells_table(delta.assign(row=delta["row"] + " − " + delta["baseline_row"]), ["row"], "column", sign=True)
        write_tables(work, "deltas", delta, display_delta)
        tasks = by_task(run)
        display_tasks = cells_table(tasks[tasks["metric"] == "overall"], ["column", "task"], "row")
        write_tables(work, "by_task", tasks, display_tasks)
        parts = breakdown(run)
        display_parts = cells_table(parts.assign(metric=parts["metric"].map(METRIC_NAMES)), ["row", "metric"], "column")
        write_tables(work, "breakdown", parts, display_parts)
        sentences = [headline(r) for r in delta.to_dict("records")]
        sections = {"Table 2 analogue: mean VIEScore [95 % CI]": display2, "Paired deltas": display_delta,
                    "Per task (VIEScore)": display_tasks, "Breakdown (Table 7 analogue)": display_parts}
        artifacts.write_text_atomic(work / "index.md", index_markdown(sections, sentences))
        draw_curves(sft_curves(run), "step", {"loss": "training loss (cross-entropy, nats/token)",
                                              "eval_loss": "validation loss (nats/token)"},
                    work / "sft_curves.png", "SFT: loss on target tokens")
        curves = rl_curves(run)
        if curves is not None:
            draw_curves(curves, "iteration", {"reward_mean": "rollout reward (0–10)",
                                              "kl": "KL to the SFT reference (k3, per token)",
                                              "heldout_reward": "held-out reward, greedy (0–10)"},
                        work / "rl_curves.png", "GRPO: reward, KL and held-out reward")
        sample_grids(run, work)
        artifacts.write_manifest(work, step="report", config=config, inputs=run.inputs(), headline=sentences)


# ----------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m earl.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["build", "paper", "figure"])
    command, rest = parser.parse_known_args(argv[:1])[0].command, argv[1:]
    sub = argparse.ArgumentParser(prog=f"python -m earl.report {command}")
    if command == "build":
        run_step(sub, build, rest)
        return
    sub.add_argument("--out", required=True, type=Path)
    if command == "figure":
        sub.add_argument("--table", required=True, type=Path, help="a table2.csv written by `report build`")
    args = sub.parse_args(rest)
    try:
        render_paper(args.out) if command == "paper" else render_table2_figure(args.table, args.out)
    except DataError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
