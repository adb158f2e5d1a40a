"""The leaderboards (results/README.md, the README's section) are what `make leaderboard` prints from
the committed comparison.csv files: a figure in them can never drift from its table."""
import csv
import shutil
from pathlib import Path

import pytest

from benchmark import leaderboard

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"


def test_the_committed_leaderboards_are_what_the_command_generates():
    assert (RESULTS / "README.md").read_text() == leaderboard.markdown(RESULTS)
    readme = (ROOT / "README.md").read_text()
    assert readme == leaderboard.with_compact(readme, RESULTS)


def _copy(tmp_path) -> Path:
    """A copy of the committed results folder, to change."""
    shutil.copytree(RESULTS, tmp_path / "results")
    return tmp_path / "results"


def test_a_changed_figure_changes_its_row_and_its_rank(tmp_path):
    results = _copy(tmp_path)
    table = results / "brain-mri-yes-no" / "cv" / "comparison.csv"
    rows = list(csv.DictReader(open(table)))
    vgg = next(r for r in rows if r["backbone"] == "vgg16")
    vgg["val_accuracy"], vgg["val_accuracy_ci_low"], vgg["val_accuracy_ci_high"] = "0.95", "0.9", "0.99"
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    text = leaderboard.markdown(results)
    assert text != leaderboard.markdown(RESULTS)
    yes_no = text[text.index("## yes/no"):]
    # rows with the far figure first; among those without it, vgg16 (hed) now ranks first at 0.950
    cells = [line.split(" | ") for line in yes_no.splitlines() if line.startswith("| ") and line[2].isdigit()]
    without_far = [(row[1], row[2], row[7]) for row in cells if row[6] == "-"]
    assert all(row[6] != "-" for row in cells[:len(cells) - len(without_far)])
    assert without_far[0] == ("vgg16", "hed", "0.950 [0.900, 0.990]")


def test_a_manifest_row_that_matches_no_table_row_is_refused(tmp_path):
    results = _copy(tmp_path)
    manifest = results / leaderboard.MANIFEST
    manifest.write_text(manifest.read_text().replace('backbone = "efficientnetb0"', 'backbone = "resnet18"'))
    with pytest.raises(LookupError, match=r"cv/comparison.csv: 0 rows for resnet18"):
        leaderboard.markdown(results)
