"""The report step: the paper's tables from config/reference, and a run's tables, deltas and figures built from
evaluation directories written per the evaluate step's contract (metrics.json, samples.parquet, images)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import REPO, tiny_config, write_config
from earl import artifacts, report, stats
from earl.config import from_dict

SFT_LABEL, RL_LABEL = "SFT (S)", "SFT (S) → RL (S+C)"
COLUMNS = {"shapes_s": "OmniEdit", "shapes_c": "AURORA"}  # borrowed paper columns, so the paper's numbers show
ROWS = {"shapes_s": 40, "shapes_c": 30}
RL_GAIN = {"shapes_s": lambda i: 1.0 if i % 2 else 3.0, "shapes_c": lambda i: 0.5}  # RL − SFT per row, by design
RL_FAILED = {"shapes_s": {4, 7}}  # judge failures of the RL model: their (garbage) scores must not count
SFT_FAILED = {"shapes_s": {10}, "shapes_c": {3}}


# ------------------------------------------------------------------------------------ synthetic inputs


def png(path, seed: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (6, 6, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    Image.fromarray(pixels).save(path)
    return path.parent.name + "/" + path.name


def sft_score(benchmark: str, i: int) -> float:
    return float(np.random.default_rng([len(benchmark), i]).uniform(0, 6))


def samples_frame(directory, benchmark: str, rl: bool, subscores: bool) -> pd.DataFrame:
    """One sample per row; RL's overall is SFT's plus RL_GAIN, written in shuffled order (pairing is by id)."""
    records = []
    for i in range(ROWS[benchmark]):
        failed = i in (RL_FAILED if rl else SFT_FAILED).get(benchmark, set())
        overall = 0.0 if failed else sft_score(benchmark, i) + (RL_GAIN[benchmark](i) if rl else 0.0)
        malformed = not rl and i % 5 == 1
        sub = {k: (overall + j if subscores else None) for j, k in enumerate(report.SUBSCORES)}
        records.append({
            "id": f"{benchmark}-{i:03d}", "sample": 0, "task": ["recolor", "add"][i % 2], "instruction": f"edit number {i}",
            "well_formed": not malformed, "failed": failed, "sc": overall + 1, "pq": overall + 2, "overall": overall, **sub,
            "image": None if malformed else png(directory / "images" / f"{i:05d}-0.png", 1000 * rl + i),
            "source_image": png(directory / "sources" / f"{i:05d}.png", 5000 + i),
            "target_image": png(directory / "targets" / f"{i:05d}.png", 9000 + i),
        })
    return pd.DataFrame(records).sample(frac=1.0, random_state=int(rl))


def metrics_of(frame: pd.DataFrame, benchmark: str, model: str) -> dict:
    """metrics.json exactly as the contract defines it, from the samples."""
    def scores(part):
        kept = part[~part["failed"]]
        out = {"n": len(part), "judge_failures": int(part["failed"].sum()), "well_formed": float(part["well_formed"].mean())}
        metrics = [*report.SCORE_METRICS, *(k for k in report.SUBSCORES if part[k].notna().any())]
        return out | {m: stats.mean_ci(kept[m].to_numpy(dtype=float)) for m in metrics}

    return {"benchmark": benchmark, "family": "simple", "paper_column": COLUMNS[benchmark], "model": model,
            "rows": frame["id"].nunique(), **scores(frame),
            "by_task": {t: {k: v for k, v in scores(p).items() if k not in report.SUBSCORES} for t, p in frame.groupby("task")}}


def write_evaluation(directory, benchmark: str, rl: bool, config) -> None:
    directory.mkdir(parents=True)
    frame = samples_frame(directory, benchmark, rl, subscores=rl and benchmark == "shapes_s")
    frame.to_parquet(directory / "samples.parquet", index=False)
    (directory / "metrics.json").write_text(json.dumps(metrics_of(frame, benchmark, "model")))
    artifacts.write_manifest(directory, step="evaluate", config=config.evaluate, inputs=[])


def write_training(paths, config) -> None:
    """SFT curves.csv and RL metrics.csv in the formats the sft and rl steps write."""
    sft = paths.sft("sft_s")
    sft.mkdir(parents=True)
    steps = np.arange(1, 21)
    pd.DataFrame({"step": steps, "epoch": steps / 10, "loss": 6 / steps, "eval_loss": np.where(steps % 5 == 0, 7 / steps, np.nan),
                  "learning_rate": 1e-3}).to_csv(sft / "curves.csv", index=False)
    artifacts.write_manifest(sft, step="sft", config=config.sft, inputs=[])
    rl = paths.rl("sft_s__rl_sc")
    rl.mkdir(parents=True)
    its = np.arange(12)
    pd.DataFrame({"iteration": its, "reward_mean": 2 + its / 10, "kl": its / 1000,
                  "heldout_reward": np.where(its % 4 == 3, 2.5 + its / 20, np.nan)}).to_csv(rl / "metrics.csv", index=False)
    artifacts.write_manifest(rl, step="rl", config=config.rl, inputs=[])


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """The default's two experiments on both shapes benchmarks, evaluated per the contract; returns
    (config file, Config, Paths)."""
    root = tmp_path_factory.mktemp("report")
    data = tiny_config(root / "results", **{f"benchmarks.{b}.paper_column": c for b, c in COLUMNS.items()})
    config = from_dict(data)
    paths = artifacts.Paths(config)
    for experiment in config.experiments:
        for benchmark in config.benchmarks:
            write_evaluation(paths.evaluate(experiment, benchmark), benchmark, experiment == "sft_s__rl_sc", config)
    write_training(paths, config)
    return write_config(root / "config.yaml", data), config, paths


@pytest.fixture(scope="module")
def built(evaluated, tmp_path_factory):
    config_file, config, paths = evaluated
    report.main(["build", "--config", config_file, "--out", str(paths.report())])
    return paths.report()


# -------------------------------------------------------------------------------------------- the paper


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper")
    report.main(["paper", "--out", str(out)])
    return out


@pytest.mark.parametrize("table", ["table2", "table3", "table7"])
def test_paper_tables_csv_reads_back_as_the_reference(paper, table):
    pd.testing.assert_frame_equal(report.read_reference(table, paper), report.read_reference(table))


def test_paper_tables_show_hand_checked_cells_and_the_derived_delta(paper):
    table2, table3, table7 = ((paper / f"table{n}.md").read_text() for n in (2, 3, 7))
    assert "| SFT (S) → RL (S+C) | Emu3 | 6.33 | 4.28 | 3.99 | 4.26 | 4.48 | 4.08 | 4.57 |" in table2
    assert "| EARL SFT (S) → RL (S+C) | Emu3 | 6.39 | 4.47 | 4.27 | 4.52 | 4.93 | 4.19 | 4.80 |" in table2
    assert "| Omnigen | – | 5.68 | 5.00 | 4.10 | 4.68 | 4.09 | 4.68 | 4.70 |" in table2
    assert "| Δ EARL SFT (S) → RL (S+C) − SFT (S) |  | 0.66 | 0.81 | 0.69 | 1.33 | 1.36 | 0.60 | 0.92 |" in table2
    assert "| SFT think (S+C) two-stage | 1.44 | 1.41 | 1.03 | 1.58 | 2.45 | 1.20 | 1.52 |" in table3
    assert "| SFT (S) → RL (S+C) | Edit Success | 7.00 | 4.20 | 3.60 | 4.10 | 4.30 | 4.30 | 4.60 |" in table7
    assert "<td>SFT (S+C) → RL (S+C)</td>" in (paper / "table2.html").read_text()


@pytest.mark.parametrize("table", ["table2", "table3"])
def test_paper_avg_is_the_mean_of_the_six_columns(table):
    """Two-decimal inputs and a two-decimal average: within 0.01 (0.005 from each rounding)."""
    wide = report.read_reference(table).pivot(index="row", columns="column", values="value")
    six = wide[["OmniEdit", "EmuEdit", "AURORA", "MB", "VisMin", "I2EBench"]].mean(axis=1)
    assert len(wide) >= 6 and ((six - wide["AVG"]).abs() <= 0.01 + 1e-9).all(), (six - wide["AVG"]).abs().max()


def test_reference_labels_name_the_paper_configs_experiments():
    labels = {e["label"] for e in __import__("yaml").safe_load(open(REPO / "config/paper.yaml"))["experiments"].values()}
    rows = set(report.read_reference("table2")["row"]) | set(report.read_reference("table3")["row"])
    assert labels <= rows, labels - rows


def test_a_reference_table_without_a_value_column_is_one_line_naming_it(tmp_path):
    (tmp_path / "table2.csv").write_text("row,column,score\nSFT (S),OmniEdit,5.73\n")
    with pytest.raises(report.DataError, match=r"table2\.csv: missing column\(s\) value$"):
        report.read_reference("table2", tmp_path)


# ----------------------------------------------------------------------------------------- a run's tables


def test_table2_equals_the_evaluations_read_back(built, evaluated):
    _, config, paths = evaluated
    table = pd.read_csv(built / "table2.csv")
    paper = {(SFT_LABEL, "OmniEdit"): 5.73, (SFT_LABEL, "AURORA"): 3.58, (RL_LABEL, "OmniEdit"): 6.33, (RL_LABEL, "AURORA"): 3.99}
    for experiment in config.experiments:
        label = config.experiments[experiment].label
        means = []
        for benchmark, column in COLUMNS.items():
            metrics = json.loads((paths.evaluate(experiment, benchmark) / "metrics.json").read_text())
            (line,) = table[(table["row"] == label) & (table["column"] == column)].to_dict("records")
            for key in ("mean", "ci_low", "ci_high", "n"):
                assert line[key] == metrics["overall"][key], (label, column, key)
            assert (line["rows"], line["judge_failures"], line["well_formed"]) == (metrics["rows"], metrics["judge_failures"], metrics["well_formed"])
            assert line["paper"] == paper[(label, column)]
            means.append(metrics["overall"]["mean"])
        (avg,) = table[(table["row"] == label) & (table["column"] == "AVG")].to_dict("records")
        assert avg["mean"] == pytest.approx(np.mean(means), abs=1e-12) and math.isnan(avg["paper"])  # not the paper's six


def test_by_task_and_breakdown_equal_the_evaluations_read_back(built, evaluated):
    _, config, paths = evaluated
    tasks, parts = pd.read_csv(built / "by_task.csv"), pd.read_csv(built / "breakdown.csv")
    metrics = json.loads((paths.evaluate("sft_s__rl_sc", "shapes_s") / "metrics.json").read_text())
    for task, scores in metrics["by_task"].items():
        for metric in report.SCORE_METRICS:
            (line,) = tasks[(tasks["row"] == RL_LABEL) & (tasks["column"] == "OmniEdit") & (tasks["task"] == task)
                            & (tasks["metric"] == metric)].to_dict("records")
            assert [line[k] for k in ("mean", "ci_low", "ci_high", "n")] == [scores[metric][k] for k in ("mean", "ci_low", "ci_high", "n")]
    rl_omni = parts[(parts["row"] == RL_LABEL) & (parts["column"] == "OmniEdit")].set_index("metric")
    assert list(rl_omni.index) == ["sc", "pq", *report.SUBSCORES, "overall"]
    for metric in rl_omni.index:
        assert rl_omni.loc[metric, "mean"] == metrics[metric]["mean"]
    assert rl_omni.loc["edit_success", "paper"] == 7.0  # Table 7's per-benchmark Edit Success
    assert set(parts[parts["row"] == SFT_LABEL]["metric"]) == {"sc", "pq", "overall"}  # verifier: no sub-scores
    assert "AVG" not in set(parts[parts["metric"] == "edit_success"]["column"])  # only one benchmark has it


def test_paired_delta_on_a_constructed_case(built):
    """RL − SFT is +1 or +3 on alternating rows of shapes_s (failures on either side dropped) and exactly +0.5 on
    shapes_c; the RL samples are stored in another order, so pairing must go by (id, sample), not file order."""
    deltas = pd.read_csv(built / "deltas.csv").set_index("benchmark")
    kept = [i for i in range(ROWS["shapes_s"]) if i not in RL_FAILED["shapes_s"] | SFT_FAILED["shapes_s"]]
    gains = [RL_GAIN["shapes_s"](i) for i in kept]
    s = deltas.loc["shapes_s"]
    assert (s["experiment"], s["baseline"], s["n"]) == ("sft_s__rl_sc", "sft_s", len(kept))
    assert s["mean"] == pytest.approx(np.mean(gains), abs=1e-9)
    assert 1.0 < s["ci_low"] < s["mean"] < s["ci_high"] < 3.0
    c = deltas.loc["shapes_c"]
    assert (c["mean"], c["ci_low"], c["ci_high"], c["n"]) == (pytest.approx(0.5), pytest.approx(0.5), pytest.approx(0.5), ROWS["shapes_c"] - 1)
    index = (built / "index.md").read_text()
    assert f"- {RL_LABEL} beats {SFT_LABEL} by +0.50 [+0.50, +0.50] VIEScore on AURORA (95 % CI, 29 paired edits)" in index


def test_markdown_and_html_show_ours_with_ci_beside_the_paper(built):
    table = (built / "table2.md").read_text().splitlines()
    assert table[0] == "| row | OmniEdit | OmniEdit (paper) | AURORA | AURORA (paper) | AVG |"
    (rl_line,) = [line for line in table if line.startswith(f"| {RL_LABEL} |")]
    assert " | 6.33 | " in rl_line and " | 3.99 | " in rl_line and rl_line.count("[") == 2
    assert "OmniEdit (paper)" in (built / "table2.html").read_text()
    wide = pd.read_csv(built / "table2_wide.csv").set_index("row")
    assert wide.loc[RL_LABEL, "OmniEdit paper"] == 6.33 and "AVG mean" in wide


def test_report_is_deterministic_and_its_figure_re_renders_from_the_csv(built, evaluated, tmp_path):
    config_file, _, _ = evaluated
    again = tmp_path / "report"
    report.main(["build", "--config", config_file, "--out", str(again)])
    produced = sorted(p.name for p in built.iterdir())
    assert produced == sorted(p.name for p in again.iterdir())
    for name in produced:
        if name != artifacts.MANIFEST:  # the manifest carries a date
            assert (built / name).read_bytes() == (again / name).read_bytes(), name
    report.main(["figure", "--table", str(built / "table2.csv"), "--out", str(tmp_path / "redrawn.png")])
    assert np.array_equal(np.asarray(Image.open(built / "table2.png")), np.asarray(Image.open(tmp_path / "redrawn.png")))


def test_figures_are_readable_images(built):
    expected = ["table2.png", "sft_curves.png", "rl_curves.png", "samples_shapes_s.png", "samples_shapes_c.png"]
    for name in expected:
        with Image.open(built / name) as image:
            image.verify()
        pixels = np.asarray(Image.open(built / name).convert("L"))
        assert 400 <= pixels.shape[1] <= 4000 and 250 <= pixels.shape[0] <= 3000, (name, pixels.shape)
        assert pixels.std() > 10, name  # not blank
    grid = Image.open(built / "samples_shapes_s.png")
    assert grid.width > grid.height * 0.7  # source | instruction | 2 models | ground truth, 6 rows


def test_report_directory_is_published_whole_with_a_manifest(built, evaluated):
    _, _, paths = evaluated
    manifest = artifacts.read_manifest(built)
    assert manifest["step"] == "report" and not built.with_name(built.name + ".partial").exists()
    assert str(paths.evaluate("sft_s", "shapes_c")) in manifest["inputs"] and str(paths.rl("sft_s__rl_sc")) in manifest["inputs"]
    assert manifest["headline"][0].startswith(f"{RL_LABEL} beats {SFT_LABEL} by +")


def test_a_missing_evaluation_is_one_line_naming_it(evaluated, tmp_path):
    config_file, config, paths = evaluated
    missing = paths.evaluate("sft_s", "shapes_c")
    hidden = missing.with_name("hidden")
    missing.rename(hidden)
    try:
        result = subprocess.run([sys.executable, "-m", "earl.report", "build", "--config", config_file, "--out", str(tmp_path / "r")],
                                capture_output=True, text=True)
    finally:
        hidden.rename(missing)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and str(missing) in result.stderr, result.stderr
    assert not (tmp_path / "r").exists()


def test_committed_readme_figure_re_renders_from_its_csv(tmp_path):
    """docs/figures/default_table2.png is the default pipeline's table2.png; it must be what its CSV draws."""
    committed = REPO / "docs" / "figures"
    if not (committed / "default_table2.csv").exists():
        pytest.skip("docs/figures/default_table2.{csv,png} not committed yet (they come from a full pipeline run)")
    report.render_table2_figure(committed / "default_table2.csv", tmp_path / "again.png")
    assert np.array_equal(np.asarray(Image.open(committed / "default_table2.png")), np.asarray(Image.open(tmp_path / "again.png")))
