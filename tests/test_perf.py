"""`make perf`'s report of a timed run: each stage per arm, the rest of the wall time, the ratio to
the cold run, and the paired difference on the same images (timing itself is never tested)."""
import numpy as np
import pandas as pd

from benchmark import perf


def _arm(wall, stages, right, seed, accuracy):
    rng = np.random.default_rng(seed)
    labels = np.arange(40) % 4
    probabilities = rng.dirichlet(np.ones(4), size=40) * 0.4
    probabilities[np.arange(40), np.where(right, labels, (labels + 1) % 4)] += 0.6
    frame = pd.DataFrame({"source": [f"{i}.png" for i in range(40)], "label": labels})
    for k, name in enumerate(["glioma", "meningioma", "notumor", "pituitary"]):
        frame[f"prob_{name}"] = probabilities[:, k]
    params = {"backbone": "efficientnet_lite0", "weights": "imagenet", "input_size": "224", "epochs2": "6",
              "unfreeze": "4", "cache_views": "3", "n_train": "160", "n_val": "40"}
    return {"wall": wall, "stages": stages, "metrics": {"val_accuracy": accuracy}, "params": params, "epochs": 6,
            "predictions": frame.sample(frac=1, random_state=seed), "data_set": "brain-tumor-mri-4class"}  # rows in another order each time


def test_the_report_tabulates_stages_other_time_ratios_and_the_paired_difference():
    right = np.arange(40) % 5 != 0  # 32 of 40 right
    seeds_right = right.copy()
    seeds_right[[0, 5, 10]] = True  # the seeds' way also gets three of the others right
    arms = {"cold caches": _arm(600.0, {"intake": 30.0, "cache": 90.0, "training": 400.0}, right, 1, 0.8),
            "warm caches": _arm(450.0, {"intake": 30.0, "training": 400.0}, right, 1, 0.8),
            "seeds' way": _arm(1500.0, {"intake": 30.0, "training": 1400.0}, seeds_right, 2, 0.875)}
    text = perf.run_report(arms, "configs/four-class-fast.toml")
    cells = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in text.splitlines()
             if line.startswith("| ")]
    rows = {row[0]: row[1:] for row in cells}
    assert rows["intake"] == ["30", "30", "30", "1.0x"]
    assert rows["cache"] == ["90", "0", "0", "0.0x"]
    assert rows["training"] == ["400", "400", "1400", "3.5x"]
    assert rows["other"] == ["80", "20", "70", "0.9x"]  # wall time no stage covers
    assert rows["**whole command**"] == ["600", "450", "1500", "2.5x"]
    assert rows["outside the training epochs (%)"] == ["33", "11", "7", ""]
    assert rows["accuracy"] == ["0.8000", "0.8000", "0.8750"]
    assert "minus seeds' way: accuracy -0.0750 [" in text and "only the seeds' way 3, McNemar p = 0.25" in text
    assert "differ from the cold run's by at most 0.0e+00" in text  # matched by source, not by row
