"""Leakage audit: near-duplicate detection, label conflicts, and group-aware splits and folds."""
import shutil
import subprocess
import sys
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageEnhance

from benchmark import audit, intake
from benchmark.phantoms import draw_slice
from conftest import SHARED, clean_env


def save(path, pixels, fmt="PNG", quality=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, fmt, **({"quality": quality} if quality else {}))


def phantom(kind, seed, size=128):
    return draw_slice(kind, size, np.random.default_rng(seed))


@pytest.fixture
def planted(tmp_path):
    """8 distinct phantoms per class, plus three altered copies of one 'yes' image and one copy filed as 'no'."""
    root = tmp_path / "d"
    for c, (name, kind) in enumerate((("no", "notumor"), ("yes", "glioma"))):
        for i in range(8):
            save(root / name / f"{i}.png", phantom(kind, 1000 * c + i))
    original = np.asarray(Image.open(root / "yes" / "0.png").convert("RGB"))
    image = Image.fromarray(original)
    save(root / "yes" / "resized.png", np.asarray(image.resize((85, 85), Image.BILINEAR)))
    save(root / "yes" / "reencoded.jpg", original, "JPEG", quality=60)
    save(root / "yes" / "brighter.png", np.asarray(ImageEnhance.Brightness(image).enhance(1.15)))
    shutil.copyfile(root / "yes" / "0.png", root / "no" / "misfiled.png")
    return root


def test_altered_copies_are_found_and_distinct_phantoms_are_not_grouped(planted):
    found = audit.run(intake.load_dataset(planted), max_distance=12)
    groups = found.table.groupby("group")["source"].apply(set).tolist()
    assert groups == [{"yes/0.png", "yes/resized.png", "yes/reencoded.jpg", "yes/brighter.png", "no/misfiled.png"}]
    assert found.summary["exact"] == (1, 2)  # misfiled.png has the same bytes as yes/0.png
    assert found.summary["near"] == (1, 5)
    assert found.summary["label_conflict"] == (1, 5) and found.summary["within_class"] == (0, 0)
    assert found.table["label_conflict"].all()


def test_audit_cli_writes_summary_csv_and_contact_sheet(planted, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "benchmark", "audit", str(planted), "--out", str(out)],
                            capture_output=True, text=True, env=clean_env())
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(out / "duplicates.csv")
    assert len(table) == 5 and table["group"].nunique() == 1
    assert "| ... across classes (label conflicts) | 1 | 5 | 4 |" in (out / "audit.md").read_text()
    assert Image.open(out / "duplicates.png").size[0] > 100
    missing = subprocess.run([sys.executable, "-m", "benchmark", "audit", str(tmp_path / "nowhere")],
                             capture_output=True, text=True, env=clean_env())
    assert missing.returncode == 1 and "nowhere: no such file or folder" in missing.stderr


def random_groups(samples, seed, n_groups):
    rng = np.random.default_rng(seed)
    return {s.source: int(rng.integers(n_groups)) for s in samples}


def test_group_aware_folds_and_split_never_split_a_group(tmp_path):
    root = tmp_path / "d"
    for c, name in enumerate(("glioma", "notumor", "pituitary")):
        for i in range(30):
            save(root / name / f"{i}.png", np.full((8, 8, 3), c * 30 + i, np.uint8))
    dataset = intake.load_dataset(root)
    groups = random_groups(dataset.splits["all"], seed=3, n_groups=25)  # about 3.6 images a group
    folds = intake.folds(dataset, 5, seed=0, groups=groups)
    seen_in_val = Counter()
    for fold in folds:
        train_groups = {groups[s.source] for s in fold["train"]}
        assert not train_groups & {groups[s.source] for s in fold["val"]}
        assert len(fold["train"]) + len(fold["val"]) == 90
        seen_in_val.update(s.source for s in fold["val"])
    assert set(seen_in_val.values()) == {1} and len(seen_in_val) == 90  # every image held out exactly once
    parts = intake.split(dataset, 0.2, seed=0, groups=groups)
    assert not {groups[s.source] for s in parts["train"]} & {groups[s.source] for s in parts["val"]}
    assert intake.folds(dataset, 5, seed=0, groups=groups)[2]["val"] == folds[2]["val"]  # same folds every time


def test_copies_of_training_images_in_a_given_test_split_are_not_scored(tmp_path, capsys):
    root = tmp_path / "d"
    for split in ("train", "test"):
        for c, (name, kind) in enumerate((("no", "notumor"), ("yes", "glioma"))):
            for i in range(6):
                save(root / split / name / f"{i}.png", phantom(kind, 100 * c + i + (50 if split == "test" else 0)))
    save(root / "test" / "yes" / "leak.jpg", np.asarray(Image.open(root / "train" / "yes" / "2.png").convert("RGB")),
         "JPEG", quality=70)
    dataset = intake.load_dataset(root)
    groups = audit.duplicate_groups(dataset, 12)
    assert groups["test/yes/leak.jpg"] == groups["train/yes/2.png"]
    parts = intake.split(dataset, 0.34, seed=0, groups=groups)
    assert "test/yes/leak.jpg" not in {s.source for s in parts["test"]} and len(parts["test"]) == 12
    assert "1 test image(s) are duplicates of training images" in capsys.readouterr().err
    assert audit.run(dataset, 12).summary["cross_split"] == (1, 2)


@pytest.mark.skipif(not (SHARED / "brain-mri-yes-no").is_dir(), reason="real data ../shared/datasets absent")
def test_real_yes_no_set_exact_duplicates():
    dataset = intake.load_dataset(SHARED / "brain-mri-yes-no")
    found = audit.run(dataset, 12)
    by_bytes = Counter(dataset.digests.values())
    assert found.summary["exact"] == (sum(n > 1 for n in by_bytes.values()), sum(n for n in by_bytes.values() if n > 1))
    assert found.summary["exact"][0] > 0  # the public set does carry byte-identical copies


def test_copies_of_one_set_in_another_are_found_with_their_closest_match(planted, tmp_path):
    other = tmp_path / "other"
    original = np.asarray(Image.open(planted / "yes" / "3.png").convert("RGB"))
    save(other / "tumour" / "rescaled.png", np.asarray(Image.fromarray(original).resize((100, 100), Image.BILINEAR)))
    save(other / "healthy" / "new.png", phantom("notumor", 777))
    shutil.copyfile(planted / "no" / "5.png", other / "healthy" / "same.png")
    copies = audit.copies_in(intake.load_dataset(planted), intake.load_dataset(other), max_distance=12)
    found = {row.source: (row.other_source, row.other_class, row.same_bytes) for row in copies.itertuples()}
    assert found == {"yes/3.png": ("tumour/rescaled.png", "tumour", False),
                     "no/5.png": ("healthy/same.png", "healthy", True)}
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "benchmark", "audit", str(planted), "--against", str(other),
                             "--out", str(out)], capture_output=True, text=True, env=clean_env())
    assert result.returncode == 0, result.stderr
    text = (out / "copies-in-other.md").read_text()
    assert "2 of 20 images of d have an exact or near copy" in text and "| yes | tumour | 1 |" in text
    assert len(pd.read_csv(out / "copies-in-other.csv")) == 2
