"""Data intake: find the layout, list and verify every image, map classes, split, fingerprint.

Everything else reads data through `load_dataset`. The user's data folder is only ever read.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import re
import stat
import sys
import threading
import warnings
import zipfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from scipy import fft

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
SYSTEM_FILES = {"thumbs.db", "desktop.ini", "__macosx"}
READ_THREADS = min(8, (os.cpu_count() or 2) * 2)  # decoding is I/O and C code: threads overlap it
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "validation": "val", "test": "test",
               "testing": "test"}


# Pillow's warnings (corrupt EXIF data, large images, palette transparency) are facts about one file:
# intake and predict report them as that file's notes (warnings_as_notes), never as raw warnings.
warnings.filterwarnings("ignore", module=r"PIL\.")
LARGE_PIXELS = 50_000_000  # far larger than any MRI slice: noted (Pillow refuses above 178,956,970)


class DataError(ValueError):
    """Unusable input; the message names every offending file or folder and why."""


class _BadImage(Exception):
    """Why one file is not a usable image."""


@dataclass(frozen=True)
class Sample:
    """One image: where it is (relative to the data root, or an .npz row) and its class index."""

    source: str
    label: int


@dataclass
class Problem:
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


@dataclass
class Dataset:
    root: Path
    layout: str
    class_names: list[str]
    splits: dict[str, list[Sample]]
    fingerprint: str
    sizes: Counter = field(default_factory=Counter)
    modes: Counter = field(default_factory=Counter)
    skipped: list[Problem] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    not_followed: list[Problem] = field(default_factory=list)  # folder links leading out of the data folder
    notes: list[Problem] = field(default_factory=list)  # usable images with something to say (decoder warnings)
    arrays: np.ndarray | None = None  # the X array of an .npz set (uint8), else None
    digests: dict[str, str] = field(default_factory=dict)  # source -> sha256 of its bytes
    # source -> perceptual hash (32 bytes), computed from the pixels the check decoded anyway
    perceptual: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return _name_of(self.root)

    @property
    def class_to_index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.class_names)}

    def counts(self, split: str) -> dict[str, int]:
        counted = Counter(sample.label for sample in self.splits[split])
        return {name: counted.get(i, 0) for i, name in enumerate(self.class_names)}

    def read(self, sample: Sample) -> np.ndarray:
        """The sample as an (H, W, 3) uint8 RGB array."""
        if self.arrays is not None:
            return self.arrays[int(sample.source)]
        return load_rgb(self.root / sample.source)


# ----------------------------------------------------------------------------------------- images
def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.lower() in SYSTEM_FILES


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Min-max scale a 16-bit, 32-bit or float image to 0..255 (MRI often uses 12 of 16 bits)."""
    array = array.astype(np.float64)
    low, high = float(array.min()), float(array.max())
    if high <= low:
        return np.zeros(array.shape, np.uint8)
    return np.round((array - low) * (255.0 / (high - low))).astype(np.uint8)


def to_rgb(image: Image.Image) -> np.ndarray:
    """Any PIL mode (L, LA, RGBA, P, CMYK, I;16, I, F, ...) as an (H, W, 3) uint8 RGB array."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        gray = _to_uint8(np.asarray(image))
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode == "P":
        image = image.convert("RGBA")
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


# Decompression bombs: Pillow's own limit (2 x Image.MAX_IMAGE_PIXELS = 178,956,970 pixels), kept
# deliberately rather than made a setting: MRI slices are at most a few megapixels, and Pillow checks
# it from the header in Image.open, before any pixel is allocated.
_BOMB = re.compile(r"\((\d+) pixels\) exceeds limit of (\d+) pixels")


def _bomb_reason(err: Exception) -> str:
    found = _BOMB.search(str(err))
    if not found:
        return f"decompression bomb ({err})"
    pixels, limit = (int(n) for n in found.groups())
    return f"decompression bomb: {pixels:,} pixels, limit {limit:,}"


_SPECIAL_FILES = ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                  (stat.S_ISBLK, "a block device"))


def _not_regular(path: Path) -> str:
    """Why `path` is no regular file ('' when it is one): a pipe or device is never opened, since
    reading one can block forever or never end."""
    mode = path.stat().st_mode
    if stat.S_ISREG(mode):
        return ""
    kind = next((name for test, name in _SPECIAL_FILES if test(mode)), "not a regular file")
    return f"{kind}, not an image file: never opened"


def _decode(path: Path) -> tuple[np.ndarray, str, tuple[int, int]]:
    """(RGB array, original mode, size); decoding fully catches truncation. Raises _BadImage(reason).

    Every exception a decoder raises on a hostile or broken file (Pillow raises OSError, SyntaxError,
    ValueError, struct.error, EOFError, DecompressionBombError, ...) is this file's problem, never the
    run's: it becomes the reason, and the other files are still read and named."""
    try:
        if special := _not_regular(path):
            raise _BadImage(special)
        if path.stat().st_size == 0:
            raise _BadImage("zero-byte file")
        with Image.open(path) as image:
            mode, size = image.mode, image.size
            image.load()
            return to_rgb(image), mode, size
    except _BadImage:
        raise
    except UnidentifiedImageError:
        raise _BadImage("not an image (no decoder recognises its contents)") from None
    except Image.DecompressionBombError as err:
        raise _BadImage(_bomb_reason(err)) from None
    except MemoryError:
        raise _BadImage("too large to decode in memory") from None
    except Exception as err:  # noqa: BLE001  (any decoder failure is a per-file error)
        raise _BadImage(f"corrupt or truncated image ({type(err).__name__}: {err})") from None


_reading = threading.local()  # .notes: the warnings of the file this thread is decoding


@contextlib.contextmanager
def warnings_as_notes():
    """While open, Pillow's warnings go to the notes of the file being read in the warning's thread
    (_decode_noting), not to the terminal. Files are read on several threads at once, and Python's
    warning state is global: so this is opened once, around the reading, on the calling thread."""
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        show = warnings.showwarning

        def to_notes(message, category, filename, lineno, file=None, line=None):
            notes = getattr(_reading, "notes", None)
            if notes is None:
                show(message, category, filename, lineno, file, line)
            elif not issubclass(category, Image.DecompressionBombWarning):  # the size note says it
                notes.append(" ".join(str(message).split()))

        warnings.showwarning = to_notes
        yield


def _decode_noting(path: Path) -> tuple[np.ndarray, str, tuple[int, int], list[str]]:
    """_decode, and its notes: what Pillow warned about meanwhile (inside warnings_as_notes), and
    that an image is far larger than an MRI slice."""
    _reading.notes = notes = []
    try:
        pixels, mode, (width, height) = _decode(path)
    finally:
        _reading.notes = None
    if width * height > LARGE_PIXELS:
        notes.insert(0, f"large image: {width} x {height} ({width * height / 1e6:.0f} megapixels), "
                        "far larger than an MRI slice")
    return pixels, mode, (width, height), list(dict.fromkeys(notes))


def load_rgb_noting(path: Path) -> tuple[np.ndarray, list[str]]:
    """One image file as (H, W, 3) uint8 RGB, and its notes; raises DataError naming the file and the reason."""
    try:
        pixels, _, _, notes = _decode_noting(path)
    except _BadImage as bad:
        raise DataError(f"{path}: {bad}") from None
    return pixels, notes


def load_rgb(path: Path) -> np.ndarray:
    """Decode one image file to (H, W, 3) uint8 RGB; raises DataError naming the file and the reason."""
    return load_rgb_noting(path)[0]


HASH_SIDE = 16  # 16x16 DCT coefficients: a 256-bit perceptual hash, stored as 32 bytes (audit.py says why)
HASH_BYTES = HASH_SIDE * HASH_SIDE // 8


def perceptual_hash(pixels: np.ndarray) -> np.ndarray:
    """pHash of an (H, W, 3) uint8 image as 32 bytes: bit = low-frequency DCT coefficient above their median."""
    grey = Image.fromarray(pixels).convert("L").resize((4 * HASH_SIDE, 4 * HASH_SIDE), Image.LANCZOS)
    coefficients = fft.dctn(np.asarray(grey, dtype=np.float64), norm="ortho")[:HASH_SIDE, :HASH_SIDE].ravel()
    return np.packbits(coefficients > np.median(coefficients[1:]))  # DC (mean brightness) left out of the median


def _inspect(path: Path) -> tuple[str, tuple[int, int], str, str, np.ndarray | None, list[str]]:
    """(reason it is unusable or '', size, mode, content hash, perceptual hash, notes) of one image
    file: one decode checks it and hashes what it shows."""
    try:
        pixels, mode, size, notes = _decode_noting(path)
    except _BadImage as bad:
        return str(bad), (0, 0), "", "", None, []
    return "", size, mode, hashlib.sha256(path.read_bytes()).hexdigest(), perceptual_hash(pixels), notes


# ----------------------------------------------------------------------------------------- layout
def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not _is_hidden(p.name))


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def walk_files(folder: Path, within: Path | None = None) -> tuple[list[Path], list[Problem]]:
    """Every non-hidden file below `folder`, and the folder links not followed. Links are followed
    (`folder` itself, linked files, folder links that stay inside `within` or inside `folder`'s own
    target), but a folder link deeper in that leads outside both is listed, not walked: a link to /
    would take in the whole disk. Never loops."""
    bounds = [os.path.realpath(folder)] + ([os.path.realpath(within)] if within else [])
    seen: set[str] = set()
    found: list[Path] = []
    outside: list[Problem] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        kept = []
        for name in sorted(d for d in dirnames if not _is_hidden(d)):
            target = os.path.realpath(Path(dirpath) / name)
            if any(_inside(target, bound) for bound in bounds):
                kept.append(name)
            else:
                outside.append(Problem(str(Path(dirpath) / name),
                                       f"folder link to {target}, outside {within or folder}: not followed"))
        dirnames[:] = kept
        found.extend(Path(dirpath) / f for f in sorted(filenames) if not _is_hidden(f))
    return found, outside


def _has_images(folder: Path) -> bool:
    return any(p.suffix.lower() in IMAGE_SUFFIXES for p in walk_files(folder)[0])


def _split_folders(folder: Path) -> dict[str, Path]:
    splits = {}
    for sub in _subdirs(folder):
        key = SPLIT_NAMES.get(sub.name.lower())
        if key and any(_has_images(c) for c in _subdirs(sub)):
            splits[key] = sub
    return splits if "train" in splits else {}


def _is_class_root(folder: Path) -> bool:
    subs = _subdirs(folder)
    return bool(subs) and any(
        p.suffix.lower() in IMAGE_SUFFIXES for s in subs for p in s.iterdir() if p.is_file()
    )


def find_root(path: Path) -> tuple[Path, dict[str, Path]]:
    """Walk down (breadth first) to the first folder that is a split root or a class root.

    Returns the root and its split folders ({} for a plain folder-per-class root).
    """
    level = [path]
    seen: set[str] = set()
    while level:
        found = []
        for folder in level:
            splits = _split_folders(folder)
            if splits or _is_class_root(folder):
                found.append((folder, splits))
        if len(found) > 1:
            names = ", ".join(str(f) for f, _ in found)
            raise DataError(f"{path}: several candidate data folders at the same depth ({names}); point at one")
        if found:
            return found[0]
        next_level = []
        for folder in level:
            for sub in _subdirs(folder):
                real = os.path.realpath(sub)
                if real not in seen:
                    seen.add(real)
                    next_level.append(sub)
        level = next_level
    raise DataError(f"{path}: no class folders with images found below this folder")


# ----------------------------------------------------------------------------------------- intake
def _check_class_names(names: list[str], where: Path) -> None:
    lowered = Counter(n.lower() for n in names)
    clashes = sorted(n for n in names if lowered[n.lower()] > 1)
    if clashes:
        raise DataError(f"{where}: class folders differ only in letter case: {', '.join(clashes)}")
    if len(names) < 2:
        raise DataError(f"{where}: only one class ({', '.join(names) or 'none'}); at least two are needed")


def _class_mapping(found: list[str], configured: list[str], where: Path) -> list[str]:
    if not configured:
        return sorted(found)
    if sorted(configured) != sorted(found):
        raise DataError(
            f"{where}: configured class_names {sorted(configured)} differ from the class folders {sorted(found)}"
        )
    return list(configured)


def samples_hash(samples: list[Sample]) -> str:
    """Which images, with which labels, in which order: part of every cache key built from them."""
    return hashlib.sha256("\n".join(f"{s.source}\t{s.label}" for s in samples).encode()).hexdigest()[:16]


def scored_on(held_out: list[list[Sample]]) -> str:
    """Which images a run scored, held out together how (one split's validation and test; each fold
    of a cross-validation): two runs' figures compare only when this is equal."""
    return hashlib.sha256(" ".join(samples_hash(part) for part in held_out).encode()).hexdigest()[:16]


def _fingerprint(entries: list[tuple[str, str]]) -> str:
    digest = hashlib.sha256()
    for rel, content_hash in sorted(entries):
        digest.update(f"{rel}\0{content_hash}\n".encode())
    return digest.hexdigest()[:16]


def _read_folders(root: Path, splits: dict[str, Path], configured: list[str], skip_bad: bool) -> Dataset:
    split_roots = splits or {"all": root}
    classes_per_split = {}
    for split, folder in split_roots.items():
        names = [d.name for d in _subdirs(folder)]
        _check_class_names(names, folder)
        classes_per_split[split] = names
    train_classes = classes_per_split.get("train", classes_per_split.get("all"))
    for split, names in classes_per_split.items():
        if sorted(names) != sorted(train_classes):
            raise DataError(
                f"{split_roots[split]}: the {split} classes {sorted(names)} differ from the train classes "
                f"{sorted(train_classes)}"
            )
    class_names = _class_mapping(train_classes, configured, root)
    index = {name: i for i, name in enumerate(class_names)}

    candidates: list[tuple[str, Path, str]] = []  # (split, file, class)
    ignored: list[str] = []
    not_followed: list[Problem] = []
    for split, folder in split_roots.items():
        for name in class_names:
            files, outside = walk_files(folder / name, within=root)
            not_followed += outside
            images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
            ignored += [str(f.relative_to(root)) for f in files if f.suffix.lower() not in IMAGE_SUFFIXES]
            if not images:
                raise DataError(f"{folder / name}: class folder '{name}' holds no images")
            candidates += [(split, f, name) for f in images]

    with warnings_as_notes(), ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
        inspected = list(pool.map(_inspect, [f for _, f, _ in candidates]))

    bad = [Problem(str(f), err) for (_, f, _), (err, *_rest) in zip(candidates, inspected) if err]
    if bad and not skip_bad:
        listing = "\n  ".join(str(p) for p in bad)
        raise DataError(f"{len(bad)} unreadable file(s) under {root} (use --skip-bad to leave them out):\n  {listing}")

    dataset = Dataset(root, "split-folders" if splits else "folders", class_names, {}, "", skipped=bad,
                      ignored=ignored, not_followed=not_followed)
    entries = []
    for (split, path, name), (err, size, mode, digest, perceptual, notes) in zip(candidates, inspected):
        if err:
            continue
        dataset.notes += [Problem(str(path), note) for note in notes]
        rel = path.relative_to(root).as_posix()
        dataset.splits.setdefault(split, []).append(Sample(rel, index[name]))
        dataset.sizes[size] += 1
        dataset.modes[mode] += 1
        dataset.digests[rel] = digest
        dataset.perceptual[rel] = perceptual
        entries.append((rel, digest))
    for split, samples in dataset.splits.items():
        counts = Counter(s.label for s in samples)
        empty = [n for n, i in index.items() if counts[i] == 0]
        if empty:
            raise DataError(f"{split_roots[split]}: no readable images left for class(es) {', '.join(empty)}")
    dataset.fingerprint = _fingerprint(entries)
    return dataset


def _read_npz(path: Path, configured: list[str]) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "X" not in archive or "Y" not in archive:
                raise DataError(f"{path}: an .npz data set needs arrays 'X' and 'Y' (found {sorted(archive.files)})")
            x, y = archive["X"], archive["Y"]
            stored_names = [str(n) for n in archive["class_names"]] if "class_names" in archive else []
    except DataError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: unreadable .npz file ({type(err).__name__}: {err})") from None
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise DataError(f"{path}: X must be (N, H, W, C) with C = 1 or 3, got shape {x.shape}")
    if y.ndim == 2:
        y = y.argmax(axis=1)
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"{path}: Y must hold one label (or one-hot row) per image; X has {len(x)}, Y {y.shape}")
    if np.issubdtype(x.dtype, np.floating):
        if x.min() < 0 or x.max() > 1:
            raise DataError(f"{path}: float X must lie in 0..1 (found {x.min():.3g}..{x.max():.3g})")
        x = np.round(x * 255).astype(np.uint8)
    elif x.dtype != np.uint8:
        raise DataError(f"{path}: X must be uint8 0..255 or float 0..1, got {x.dtype}")
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    labels = y.astype(int)
    n_classes = int(labels.max()) + 1
    found = stored_names or [str(i) for i in range(n_classes)]
    if len(found) < n_classes:
        raise DataError(f"{path}: labels go up to {n_classes - 1} but only {len(found)} class_names are stored")
    _check_class_names(found, path)
    class_names = _class_mapping(found, configured, path)
    remap = np.array([class_names.index(name) for name in found])
    missing = sorted(set(found) - {found[i] for i in np.unique(labels)})
    if missing:
        raise DataError(f"{path}: class(es) {', '.join(missing)} have no images")
    samples = [Sample(str(i), int(remap[label])) for i, label in enumerate(labels)]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    dataset = Dataset(path, "npz", class_names, {"all": samples}, _fingerprint([(path.name, digest)]),
                      arrays=x)
    dataset.digests = {s.source: hashlib.sha256(x[int(s.source)].tobytes()).hexdigest() for s in samples}
    dataset.sizes[(x.shape[2], x.shape[1])] = len(x)
    dataset.modes["RGB" if x.shape[-1] == 3 else "L"] = len(x)
    return dataset


def _name_of(root: Path) -> str:
    """A set's name: its .npz file's stem or its folder's name; a split folder such as Training/ takes its parent's."""
    if root.is_file():
        return root.stem
    return root.parent.name if root.name.lower() in SPLIT_NAMES else root.name


def data_set_name(path: str | Path) -> str:
    """The name `load_dataset(path).name` would give, from the folder layout alone (no image is read)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    return _name_of(path if path.is_file() else find_root(path)[0])


def load_dataset(path: str | Path, class_names: list[str] | None = None, skip_bad: bool = False) -> Dataset:
    """Read a data set in any supported layout; raises DataError with every problem found."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix.lower() != ".npz":
            raise DataError(f"{path}: a data set is a folder of class folders or an .npz file")
        return _read_npz(path, class_names or [])
    root, splits = find_root(path)
    return _read_folders(root, splits, class_names or [], skip_bad)


def without(dataset: Dataset, sources: set[str]) -> Dataset:
    """The data set less the images named in `sources` (every split); the files are untouched."""
    return dataclasses.replace(dataset, splits={name: [s for s in samples if s.source not in sources]
                                                for name, samples in dataset.splits.items()})


def _group_of(samples: list[Sample], groups: dict[str, int] | None) -> list:
    """Each sample's duplicate group; a sample with none (or no grouping at all) is a group of its own."""
    groups = groups or {}
    return [groups.get(s.source, f"alone:{s.source}") for s in samples]


def _grouped_folds(pool: list[Sample], k: int, seed: int, groups: dict[str, int] | None, where: Path):
    """k stratified folds of `pool` (sorted first, so listing order never matters) that keep every
    duplicate group whole; yields (train, val) sample lists."""
    from sklearn.model_selection import StratifiedGroupKFold

    pool = sorted(pool, key=lambda s: s.source)
    labels = [s.label for s in pool]
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "least populated class has only n members"
            indices = list(splitter.split(pool, labels, _group_of(pool, groups)))
    except ValueError as err:
        raise DataError(f"{where}: too few images (or duplicate groups) for {k} stratified parts ({err})") from None
    for train, val in indices:
        if len({labels[i] for i in val}) < 2:
            raise DataError(f"{where}: a validation part of 1/{k} of the images holds fewer than two classes")
        yield [pool[i] for i in train], [pool[i] for i in val]


def _without_copies_of(samples: list[Sample], training: list[Sample], groups: dict[str, int] | None,
                       split_name: str) -> list[Sample]:
    """`samples` less those with a duplicate among `training`: a copy of a training image is never scored."""
    if not groups:
        return samples
    seen = set(_group_of(training, groups))
    kept = [s for s, g in zip(samples, _group_of(samples, groups)) if g not in seen]
    if len(kept) < len(samples):
        print(f"note: {len(samples) - len(kept)} {split_name} image(s) are duplicates of training images "
              f"and are left out of scoring (see `python -m benchmark audit`)", file=sys.stderr)
    return kept


def split(dataset: Dataset, val_fraction: float, seed: int,
          groups: dict[str, int] | None = None) -> dict[str, list[Sample]]:
    """train/val(/test) lists: given splits are kept, a missing val is carved from train, stratified.

    With `groups` (source -> duplicate group, from the audit) a group never straddles train and
    val, and val/test images that copy a training image are left out. A carved val is one of
    round(1 / val_fraction) group-aware stratified folds (fewer when a class has fewer images),
    so its size is close to val_fraction.
    Samples are sorted first, so the same seed gives the same split whatever the listing order.
    """
    given = dict(dataset.splits)
    pool = given.pop("all", None) or given.pop("train")
    train = pool
    if "val" not in given:
        smallest = min(Counter(s.label for s in pool).values())
        k = max(2, min(round(1 / val_fraction), smallest))  # a tiny class can't fill more folds than it has images
        train, given["val"] = next(_grouped_folds(pool, k, seed, groups, dataset.root))
    # a given val must not copy train; test must copy neither train nor the val that chose the model
    held_out = {"val": _without_copies_of(given["val"], train, groups, "val")}
    held_out.update({name: _without_copies_of(samples, [*pool, *given["val"]], groups, name)
                     for name, samples in given.items() if name != "val"})
    return {"train": train, **held_out}


def folds(dataset: Dataset, k: int, seed: int, groups: dict[str, int] | None = None) -> list[dict[str, list[Sample]]]:
    """k cross-validation parts {train, val(, test)} over all non-test images (a given val joins
    the pool), stratified and group-aware; the test split, if any, stays out of every fold."""
    given = dict(dataset.splits)
    test = given.pop("test", None)
    pool = [s for samples in given.values() for s in samples]
    held_out = {"test": _without_copies_of(test, pool, groups, "test")} if test is not None else {}
    return [{"train": train, "val": val, **held_out}
            for train, val in _grouped_folds(pool, k, seed, groups, dataset.root)]
