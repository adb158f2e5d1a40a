"""Leakage audit: exact duplicates (same bytes) and near duplicates (perceptual hash of the decoded
image) within and across classes and splits.

Near duplicates are pairs whose 256-bit DCT hashes (pHash: grey, 64x64, lowest 16x16 frequencies
against their median) differ in at most `max_distance` bits. Resizing, re-encoding and brightness
changes move a hash by 0-10 bits; brain slices are alike at low frequencies, so the common 64-bit
pHash is too coarse for them (two different phantoms can be 2 bits apart), while at 256 bits
distinct phantoms stay 20+ apart and the 4-class set's groups barely change from 8 to 20 bits.
Groups are the connected components of exact and near pairs, and the splitter keeps each group
on one side, so no copy of a training image is ever scored.
"""
from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.sparse.csgraph import connected_components

from . import cache, intake
from .intake import HASH_BYTES, HASH_SIDE, perceptual_hash


def perceptual_hashes(dataset: intake.Dataset, samples: list[intake.Sample]) -> np.ndarray:
    """(N, 32) uint8 hashes: those intake computed while checking the files, else (an .npz set)
    computed in parallel once per data set and kept in the cache."""
    if all(s.source in dataset.perceptual for s in samples):
        return np.array([dataset.perceptual[s.source] for s in samples], np.uint8).reshape(len(samples), HASH_BYTES)
    key = {"fingerprint": dataset.fingerprint, "samples": intake.samples_hash(samples), "hash": f"phash{HASH_SIDE}"}

    def fill(out):
        with ThreadPoolExecutor(max_workers=intake.READ_THREADS) as pool:
            out[:] = list(pool.map(lambda s: perceptual_hash(dataset.read(s)), samples))

    return np.asarray(cache.cached_array("phash", key, (len(samples), HASH_BYTES), np.uint8, fill))


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bits that differ between packed hashes (broadcasting over all but the last axis)."""
    return np.bitwise_count(a ^ b).sum(axis=-1, dtype=np.int32)


def nearest_distances(queries: np.ndarray, references: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Each query hash's distance in bits to its nearest reference hash (chunks bound the memory)."""
    return np.concatenate([hamming(queries[start:start + chunk, None, :], references[None, :, :]).min(axis=1)
                           for start in range(0, len(queries), chunk)])


def near_pairs(hashes: np.ndarray, max_distance: int, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) for every pair i < j whose hashes differ in at most `max_distance` bits."""
    found_i, found_j = [], []
    for start in range(0, len(hashes), chunk):
        i, j = np.nonzero(hamming(hashes[start:start + chunk, None, :], hashes[None, :, :]) <= max_distance)
        i += start
        found_i.append(i[i < j]), found_j.append(j[i < j])
    return np.concatenate(found_i), np.concatenate(found_j)


def group_ids(digests: list[str], hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """Group number per image: connected components of exact (same bytes) and near pairs."""
    n = len(digests)
    i, j = near_pairs(hashes, max_distance)
    first_with = {}
    exact_i, exact_j = [], []
    for index, digest in enumerate(digests):
        if digest in first_with:
            exact_i.append(first_with[digest]), exact_j.append(index)
        first_with.setdefault(digest, index)
    rows = np.concatenate([i, np.array(exact_i, dtype=int)])
    cols = np.concatenate([j, np.array(exact_j, dtype=int)])
    graph = sparse.coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def labelled_samples(dataset: intake.Dataset) -> list[tuple[str, intake.Sample]]:
    """(split, sample) for every image, in a fixed order."""
    return [(split, s) for split in sorted(dataset.splits)
            for s in sorted(dataset.splits[split], key=lambda s: s.source)]


def _hashed_and_grouped(dataset: intake.Dataset, max_distance: int):
    """(split, sample) pairs, their byte digests, perceptual hashes and group numbers, in one fixed order."""
    labelled = labelled_samples(dataset)
    samples = [s for _, s in labelled]
    digests = [dataset.digests[s.source] for s in samples]
    hashes = perceptual_hashes(dataset, samples)
    return labelled, digests, hashes, group_ids(digests, hashes, max_distance)


def duplicate_groups(dataset: intake.Dataset, max_distance: int) -> dict[str, int]:
    """source -> group number, for the splitter; images with no duplicate get a group of their own."""
    labelled, _, _, ids = _hashed_and_grouped(dataset, max_distance)
    return {s.source: int(g) for (_, s), g in zip(labelled, ids)}


@dataclass
class Audit:
    """Every image that has a copy, one row each, and the counts that summarise them."""

    dataset: intake.Dataset
    max_distance: int
    table: pd.DataFrame  # group, split, class, source, sha256, phash, exact_copies, label_conflict
    summary: dict

    def markdown(self) -> str:
        s = self.summary
        lines = [
            f"# Leakage audit: {self.dataset.name}", "",
            f"`python -m benchmark audit` on {s['images']} images "
            f"({', '.join(f'{k} {v}' for k, v in s['per_split'].items())}); "
            f"perceptual hash pHash-256, near = Hamming distance <= {self.max_distance} bits; "
            f"groups are connected components of exact and near pairs.", "",
            "| finding | groups | images | copies beyond the first |", "|---|---:|---:|---:|",
        ]
        for label, key in (("exact duplicates (same bytes)", "exact"), ("exact or near duplicates", "near"),
                           ("... of which within one class only", "within_class"),
                           ("... across classes (label conflicts)", "label_conflict"),
                           ("... across splits", "cross_split")):
            groups, images = s[key]
            lines.append(f"| {label} | {groups} | {images} | {images - groups} |")
        lines += ["", f"Largest group: {s['largest_group']} images. "
                  f"Share of images that have a copy: {s['share_with_copy']:.1%}.", "",
                  "Splits and cross-validation folds keep every group on one side (data.group_duplicates).",
                  "Groups are listed in duplicates.csv; duplicates.png shows example pairs.", ""]
        return "\n".join(lines)


def run(dataset: intake.Dataset, max_distance: int) -> Audit:
    """Hash every image, group the copies, count them by class and split."""
    labelled, digests, hashes, ids = _hashed_and_grouped(dataset, max_distance)
    sizes = Counter(ids.tolist())
    digest_counts = Counter(digests)
    rows = [{"group": int(g), "split": split, "class": dataset.class_names[s.label], "source": s.source,
             "sha256": digests[k], "phash": hashes[k].tobytes().hex(), "exact_copies": digest_counts[digests[k]] - 1}
            for k, ((split, s), g) in enumerate(zip(labelled, ids)) if sizes[int(g)] > 1]
    table = pd.DataFrame(rows, columns=["group", "split", "class", "source", "sha256", "phash", "exact_copies"])
    per_group = table.groupby("group").agg(classes=("class", "nunique"), splits=("split", "nunique"),
                                           images=("source", "size"))
    table["label_conflict"] = table["group"].map(per_group["classes"] > 1).astype(bool)
    table = table.sort_values(["group", "split", "class", "source"]).reset_index(drop=True)
    # renumber groups 1..G in order of appearance, so the CSV reads top to bottom
    table["group"] = table["group"].map({g: n + 1 for n, g in enumerate(table["group"].unique())})

    def count(mask) -> tuple[int, int]:
        chosen = per_group[mask]
        return int(len(chosen)), int(chosen["images"].sum())

    exact_groups = [n for n in digest_counts.values() if n > 1]
    summary = {
        "images": len(labelled),
        "per_split": {split: len(dataset.splits[split]) for split in sorted(dataset.splits)},
        "exact": (len(exact_groups), int(sum(exact_groups))),
        "near": count(per_group["images"] > 1),
        "within_class": count(per_group["classes"] == 1),
        "label_conflict": count(per_group["classes"] > 1),
        "cross_split": count(per_group["splits"] > 1),
        "largest_group": int(per_group["images"].max()) if len(per_group) else 0,
        "share_with_copy": len(table) / max(1, len(labelled)),
    }
    return Audit(dataset, max_distance, table, summary)


def copies_in(dataset: intake.Dataset, other: intake.Dataset, max_distance: int) -> pd.DataFrame:
    """Every image of `dataset` with an exact or near copy in `other` (e.g. a set to test on against
    a set something was trained on), with its closest copy there: one row each."""
    mine, theirs = labelled_samples(dataset), labelled_samples(other)
    hashes = perceptual_hashes(dataset, [s for _, s in mine])
    other_hashes = perceptual_hashes(other, [s for _, s in theirs])
    by_digest = {other.digests[s.source]: k for k, (_, s) in enumerate(theirs)}
    rows = []
    for k, (split, sample) in enumerate(mine):
        distances = hamming(hashes[k][None], other_hashes) if len(theirs) else np.zeros(0, np.int32)
        exact = by_digest.get(dataset.digests[sample.source])
        closest = exact if exact is not None else (int(distances.argmin()) if len(distances) else None)
        if closest is None or (exact is None and distances[closest] > max_distance):
            continue
        other_split, other_sample = theirs[closest]
        rows.append({"split": split, "class": dataset.class_names[sample.label], "source": sample.source,
                     "other_split": other_split, "other_class": other.class_names[other_sample.label],
                     "other_source": other_sample.source, "distance": int(distances[closest]),
                     "same_bytes": exact is not None})
    return pd.DataFrame(rows, columns=["split", "class", "source", "other_split", "other_class", "other_source",
                                       "distance", "same_bytes"])


def copies_markdown(copies: pd.DataFrame, dataset: intake.Dataset, other: intake.Dataset, max_distance: int) -> str:
    images = sum(len(samples) for samples in dataset.splits.values())
    lines = [f"# Copies of {dataset.name} in {other.name}", "",
             f"{len(copies)} of {images} images of {dataset.name} have an exact or near copy (pHash-256, at most "
             f"{max_distance} bits apart) in {other.name}; {int(copies['same_bytes'].sum())} of them the same bytes. "
             f"A model trained on {other.name} has seen these images: scores on them are not scores on unseen data.",
             "", "| class here | class there | images |", "|---|---|---:|"]
    for (here, there), count in copies.groupby(["class", "other_class"]).size().items():
        lines.append(f"| {here} | {there} | {count} |")
    return "\n".join(lines) + "\n"


def contact_sheet(audit: Audit, pairs: int = 12):
    """Example pairs side by side: label conflicts first, then pairs across splits, then the near
    pairs furthest apart (the closest calls, to judge the threshold by)."""
    from . import plots

    if audit.table.empty:
        return plots.message_figure(f"{audit.dataset.name}: no duplicates at distance <= {audit.max_distance}")
    examples = []
    for group, rows in audit.table.groupby("group"):
        hashes = np.stack([np.frombuffer(bytes.fromhex(h), np.uint8) for h in rows["phash"]])
        distances = hamming(hashes[:, None, :], hashes[None, :, :])
        linked = np.argwhere(np.triu(distances <= audit.max_distance, 1))  # pairs that are themselves near
        i, j = max(linked, key=lambda ij: (rows.iloc[ij[0]].split != rows.iloc[ij[1]].split, distances[tuple(ij)]))
        first, second = rows.iloc[i], rows.iloc[j]
        distance = int(distances[i, j])
        examples.append((not first.label_conflict, first.split == second.split, -distance, group, first, second))
    shown = []
    for _, _, distance, group, first, second in sorted(examples)[:pairs]:
        kind = "same bytes" if first.sha256 == second.sha256 else f"{-distance} bits apart"
        images = [audit.dataset.read(intake.Sample(row.source, 0)) for row in (first, second)]
        captions = [f"{row.split}/{row['class']}\n{Path(row.source).name}" for row in (first, second)]
        shown.append((images, captions, f"group {group}: {kind}" + (" LABEL CONFLICT" if first.label_conflict else "")))
    return plots.pair_sheet(shown, f"{audit.dataset.name}: example duplicate pairs")


def write(audit: Audit, out_dir: Path) -> dict[str, Path]:
    """audit.md, duplicates.csv and duplicates.png under `out_dir`."""
    from . import plots

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / "audit.md", "csv": out_dir / "duplicates.csv", "png": out_dir / "duplicates.png"}
    paths["md"].write_text(audit.markdown())
    audit.table.to_csv(paths["csv"], index=False)
    figure = contact_sheet(audit)
    figure.savefig(paths["png"], dpi=90)
    plots.plt.close(figure)
    return paths
