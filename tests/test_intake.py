import hashlib
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmark import intake
from benchmark.intake import DataError, load_dataset
from conftest import SHARED, bomb_png, broken_exif_jpeg, clean_env, image_folder, write_image


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file() and not path.is_symlink():
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def messy(tmp_path):
    """A Kaggle-style download: nested folders, every image mode and suffix, hidden and system files."""
    root = tmp_path / "download" / "brain_tumor_dataset"
    write_image(root / "yes" / "Y1.JPG", "RGB", fmt="JPEG")
    write_image(root / "yes" / "y 2.jpeg", "CMYK", fmt="JPEG")
    write_image(root / "yes" / "y3.png", "I;16")
    write_image(root / "yes" / "y4.tiff", "RGBA")
    write_image(root / "yes" / "sub" / "y5.bmp", "P")
    write_image(root / "no" / "n1.png", "LA")
    write_image(root / "no" / "n2.tif", "L")
    write_image(root / "no" / "n3.png", "P")
    write_image(root / "no" / "really_png.jpg", "RGB", fmt="PNG")  # wrong extension, still an image
    (root / "no" / ".DS_Store").write_bytes(b"\0\1junk")
    (root / "no" / "Thumbs.db").write_bytes(b"junk")
    (root / "no" / "._n1.png").write_bytes(b"AppleDouble junk")
    (root / "no" / "notes.txt").write_text("scanner notes")
    os.symlink(root / "yes", root / "yes" / "sub" / "loop")  # a symlink loop
    return tmp_path / "download"


def test_messy_kaggle_download_is_found_and_decoded(messy):
    dataset = load_dataset(messy)
    assert dataset.root.name == "brain_tumor_dataset"
    assert dataset.class_names == ["no", "yes"]
    assert dataset.counts("all") == {"no": 4, "yes": 5}
    assert dataset.ignored == ["no/notes.txt"]
    assert set(dataset.modes) == {"RGB", "CMYK", "I;16", "RGBA", "P", "LA", "L"}
    for sample in dataset.splits["all"]:
        pixels = dataset.read(sample)
        assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3


def test_sixteen_bit_images_are_scaled_to_full_range(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 1000], [2000, 4000]], dtype=np.uint16)).save(path)
    pixels = intake.load_rgb(path)
    assert pixels[..., 0].tolist() == [[0, 64], [128, 255]]


@pytest.fixture
def with_bad_files(tmp_path):
    root = image_folder(tmp_path / "data")
    good = write_image(tmp_path / "good.png", "RGB")
    (root / "yes" / "corrupt.jpg").write_bytes(os.urandom(300))
    (root / "yes" / "truncated.png").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (root / "no" / "empty.png").write_bytes(b"")
    (root / "no" / "text.png").write_text("not an image at all")
    bomb_png(root / "no" / "bomb.png")
    return root


def test_bad_files_are_all_named_with_reasons(with_bad_files):
    before = tree_digest(with_bad_files)
    with pytest.raises(DataError) as err:
        load_dataset(with_bad_files)
    message = str(err.value)
    assert "5 unreadable file(s)" in message
    for name, reason in [("corrupt.jpg", "not an image"), ("truncated.png", "truncated"),
                         ("empty.png", "zero-byte"), ("text.png", "not an image"),
                         ("bomb.png", "decompression bomb: 225,000,000 pixels, limit 178,956,970")]:
        line = next(line for line in message.splitlines() if name in line)
        assert reason in line
    assert tree_digest(with_bad_files) == before  # only ever read


def test_skip_bad_leaves_them_out_and_counts_them(with_bad_files):
    dataset = load_dataset(with_bad_files, skip_bad=True)
    assert dataset.counts("all") == {"no": 4, "yes": 4}
    assert sorted(Path(p.path).name for p in dataset.skipped) == [
        "bomb.png", "corrupt.jpg", "empty.png", "text.png", "truncated.png"]


def test_the_bomb_is_refused_from_its_header_without_allocating(tmp_path):
    import tracemalloc

    path = bomb_png(tmp_path / "bomb.png")
    tracemalloc.start()
    with pytest.raises(DataError, match="decompression bomb: 225,000,000 pixels"):
        intake.load_rgb(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 10_000_000  # decoding it would take 675 MB


@pytest.mark.parametrize("error", [SyntaxError("broken header"), __import__("struct").error("unpack requires 4 bytes"),
                                   EOFError("no more data"), ValueError("bad tile"), IndexError("list index"),
                                   RuntimeError("decoder state")])
def test_any_decoder_exception_is_a_per_file_reason(tmp_path, monkeypatch, error):
    root = image_folder(tmp_path / "d")
    write_image(root / "yes" / "weird.png", "L")
    real_open = intake.Image.open

    def fake_open(path, *args, **kwargs):
        if Path(path).name == "weird.png":
            raise error
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(intake.Image, "open", fake_open)
    with pytest.raises(DataError) as err:
        load_dataset(root)
    line = next(line for line in str(err.value).splitlines() if "weird.png" in line)
    assert type(error).__name__ in line and str(error) in line
    assert load_dataset(root, skip_bad=True).counts("all") == {"no": 4, "yes": 4}


@pytest.mark.parametrize("make, expected", [
    (lambda r: (image_folder(r), (r / "yes2").mkdir()), "'yes2' holds no images"),
    (lambda r: image_folder(r, classes=("only",)), "only one class"),
    (lambda r: image_folder(r, classes=("Yes", "no", "yes")), "differ only in letter case"),
    (lambda r: (image_folder(r / "train"), image_folder(r / "test", classes=("no", "maybe"))),
     "test classes ['maybe', 'no'] differ from the train classes ['no', 'yes']"),
])
def test_structural_errors_say_exactly_what_is_wrong(tmp_path, make, expected):
    make(tmp_path / "d")
    with pytest.raises(DataError, match=None) as err:
        load_dataset(tmp_path / "d")
    assert expected in str(err.value)


@pytest.mark.parametrize("names", [("train", "val", "test"), ("Training", "Testing")])
def test_pre_split_layouts(tmp_path, names):
    for name in names:
        image_folder(tmp_path / "d" / name, per_class=3)
    dataset = load_dataset(tmp_path / "d")
    assert dataset.layout == "split-folders"
    assert sorted(dataset.splits) == sorted({"train", "val", "test"} & {intake.SPLIT_NAMES[n.lower()] for n in names})
    parts = intake.split(dataset, 0.25, seed=1)
    assert set(parts) == {"train", "val", "test"}
    assert len(parts["test"]) == 6


def test_class_mapping_sorted_or_configured(tmp_path):
    root = image_folder(tmp_path / "d", classes=("pituitary", "glioma", "notumor"))
    assert load_dataset(root).class_names == ["glioma", "notumor", "pituitary"]
    configured = load_dataset(root, class_names=["notumor", "glioma", "pituitary"])
    assert configured.class_to_index == {"notumor": 0, "glioma": 1, "pituitary": 2}
    assert {s.source.split("/")[0]: s.label for s in configured.splits["all"]}["pituitary"] == 2
    with pytest.raises(DataError, match="differ from the class folders"):
        load_dataset(root, class_names=["glioma", "notumor"])


def test_split_is_stratified_and_independent_of_listing_order(tmp_path):
    dataset = load_dataset(image_folder(tmp_path / "d", per_class=10))
    first = intake.split(dataset, 0.2, seed=7)
    assert sorted(s.label for s in first["val"]) == [0, 0, 1, 1]
    random.Random(0).shuffle(dataset.splits["all"])
    again = intake.split(dataset, 0.2, seed=7)
    assert [s.source for s in again["val"]] == [s.source for s in first["val"]]
    assert [s.source for s in intake.split(dataset, 0.2, seed=8)["val"]] != [s.source for s in first["val"]]


def test_fingerprint_tracks_content_not_location(tmp_path):
    root = image_folder(tmp_path / "a")
    first = load_dataset(root).fingerprint
    shutil.copytree(root, tmp_path / "b")
    assert load_dataset(tmp_path / "b").fingerprint == first
    write_image(tmp_path / "b" / "yes" / "img 0.png", "L", seed=999)
    assert load_dataset(tmp_path / "b").fingerprint != first


@pytest.mark.parametrize("x_kind", ["uint8", "float", "gray"])
@pytest.mark.parametrize("onehot", [False, True])
def test_npz_sets(tmp_path, x_kind, onehot):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (12, 8, 8, 1 if x_kind == "gray" else 3), dtype=np.uint8)
    y = np.arange(12) % 3
    stored_x = x / 255.0 if x_kind == "float" else x
    stored_y = np.eye(3)[y] if onehot else y
    np.savez(tmp_path / "set.npz", X=stored_x, Y=stored_y, class_names=np.array(["c", "a", "b"]))
    dataset = load_dataset(tmp_path / "set.npz")
    assert dataset.layout == "npz" and dataset.name == "set"
    assert dataset.class_names == ["a", "b", "c"]
    labels = [dataset.class_names[s.label] for s in dataset.splits["all"]]
    assert labels == [["c", "a", "b"][i] for i in y]
    first = dataset.read(dataset.splits["all"][0])
    assert first.shape == (8, 8, 3) and np.array_equal(first[..., 0], x[0, ..., 0])


def test_npz_errors_name_the_file(tmp_path):
    np.savez(tmp_path / "bad.npz", X=np.zeros((3, 4, 4, 3)), labels=np.zeros(3))
    with pytest.raises(DataError, match=r"bad\.npz: an \.npz data set needs arrays 'X' and 'Y'"):
        load_dataset(tmp_path / "bad.npz")
    np.savez(tmp_path / "range.npz", X=np.full((2, 4, 4, 3), 7.0), Y=np.array([0, 1]))
    with pytest.raises(DataError, match=r"range\.npz: float X must lie in 0\.\.1"):
        load_dataset(tmp_path / "range.npz")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "benchmark", *args], capture_output=True, text=True, env=clean_env(),
                          timeout=300)


def test_links_out_of_the_data_folder_are_listed_not_walked_and_pipes_never_opened(tmp_path):
    """A class folder that is itself a link is followed, as users rely on; a folder link deeper in
    that leads outside (here to /) is listed with its target; a pipe is named, never opened."""
    root = image_folder(tmp_path / "data", classes=("no",))
    image_folder(tmp_path / "elsewhere", classes=("yes",))
    os.symlink(tmp_path / "elsewhere" / "yes", root / "yes")
    os.symlink("/", root / "no" / "rootfs")
    os.mkfifo(root / "no" / "stream.png")
    refused = run_cli("check-data", str(root))
    assert refused.returncode == 1
    assert f"{root / 'no' / 'stream.png'}: a named pipe, not an image file: never opened" in refused.stderr
    checked = run_cli("check-data", str(root), "--skip-bad")
    assert checked.returncode == 0, checked.stderr
    assert "all         8 images: no 4, yes 4" in checked.stdout
    assert "1 bad file(s) skipped, 0 non-image file(s) ignored, 1 folder link(s) out of the data folder not followed" \
        in checked.stdout
    assert f"  skipped {root / 'no' / 'rootfs'}: folder link to /, outside {root}: not followed" in checked.stdout


def test_decoder_warnings_are_notes_of_their_files_not_raw_warnings(tmp_path):
    root = image_folder(tmp_path / "data")
    Image.new("L", (11000, 11000)).save(root / "yes" / "huge.png")  # legal, but 121 megapixels
    broken_exif_jpeg(root / "no" / "exif.jpg")
    result = run_cli("check-data", str(root))
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert "all        10 images: no 5, yes 5" in result.stdout and "notes:       2 on usable images" in result.stdout
    assert f"  note {root / 'yes' / 'huge.png'}: large image: 11000 x 11000 (121 megapixels), far larger than an " \
        "MRI slice" in result.stdout
    assert f"  note {root / 'no' / 'exif.jpg'}: Corrupt EXIF data. Expecting to read" in result.stdout
    assert "Warning" not in result.stdout and "site-packages" not in result.stdout


def test_check_data_exit_codes(with_bad_files):
    """Every bad file named (the decompression bomb too), never a traceback; --skip-bad counts them."""
    failed = run_cli("check-data", str(with_bad_files))
    assert failed.returncode == 1
    for name in ("bomb.png", "corrupt.jpg", "empty.png", "text.png", "truncated.png"):
        assert name in failed.stderr
    assert "zero-byte" in failed.stderr and "decompression bomb: 225,000,000 pixels" in failed.stderr
    skipped = run_cli("check-data", str(with_bad_files), "--skip-bad")
    assert skipped.returncode == 0
    assert "5 bad file(s) skipped" in skipped.stdout and "all         8 images: no 4, yes 4" in skipped.stdout
    assert "Traceback" not in failed.stderr + failed.stdout + skipped.stderr + skipped.stdout


@pytest.mark.skipif(not (SHARED / "brain-mri-yes-no").is_dir(), reason="real data ../shared/datasets absent")
def test_check_data_on_real_yes_no_set():
    result = run_cli("check-data", str(SHARED / "brain-mri-yes-no"))
    assert result.returncode == 0, result.stderr
    assert "classes:     2 (no, yes" in result.stdout
    assert "all       253 images: no 98, yes 155" in result.stdout
    assert "0 bad file(s) skipped" in result.stdout


@pytest.mark.skipif(not (SHARED / "brain-tumor-mri-4class").is_dir(), reason="real data ../shared/datasets absent")
def test_check_data_on_real_four_class_set():
    result = run_cli("check-data", str(SHARED / "brain-tumor-mri-4class"))
    assert result.returncode == 0, result.stderr
    assert "train    5708 images: glioma 1321, meningioma 1339, notumor 1591, pituitary 1457" in result.stdout


def test_commands_print_only_their_own_lines(tmp_path):
    """TensorFlow's start-up lines (absl, oneDNN, CUDA probing) stay hidden unless -v asks for them."""
    root = image_folder(tmp_path / "d")
    noise = ("absl::InitializeLog", "oneDNN", "cuInit", "cuda drivers")
    for command in (["check-data", str(root)], ["report", "--data", str(root), "--set",
                                                f'tracking.results_dir="{tmp_path}"']):
        result = subprocess.run([sys.executable, "-m", "benchmark", *command], capture_output=True, text=True,
                                env=clean_env())
        assert not [line for line in (result.stdout + result.stderr).splitlines() if any(n in line for n in noise)]
    loud = subprocess.run([sys.executable, "-m", "benchmark", "-v", "report", "--data", str(root), "--set",
                           f'tracking.results_dir="{tmp_path}"'], capture_output=True, text=True, env=clean_env())
    assert any(n in loud.stderr for n in noise)
    assert "no finished bench runs" in loud.stderr or "no experiment" in loud.stderr.lower()
