"""One data owner's images, loaded from its own path and labelled in the run's class order.

A federation's data owners (a hospital, a phone, a company) each hold their own images. This
module loads one owner's data from one path string (:mod:`flora_lightning.data.source_spec`:
an imagefolder directory, parquet files, or ``hub:ID[:SPLIT]``), maps its labels **by class
name** to the run's ``data.class_names`` (the YAML's list, so every owner agrees on what label 3
means whatever order its folders sort in), checks every image decodes, and returns the rows in
the form a simulated partition has: a ``datasets.Dataset`` with the run's ``data.image_column``
(an ``Image`` feature) and ``data.label_column`` (a ``ClassLabel`` of the run's classes).

:class:`~flora_lightning.data.datamodule.FederatedDataModule` uses it for
``data.partition.kind: folders`` (one path per client, in process) and for a Flower node's own
``data-path`` (:meth:`~flora_lightning.data.datamodule.FederatedDataModule.setup_node`), so a
node trains on exactly the rows the in-process twin gives that client.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flora_lightning.data.source_spec import SourceSpec, check_source_exists

MAX_LISTED = 10
"""At most this many unknown labels or unreadable files are named in a message."""


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
"""Image files that may not lie directly in an imagefolder (they would have no class)."""


class LocalSourceError(ValueError):
    """A data owner's data cannot be used as it is; the message names its path and the fix."""


@dataclass(frozen=True)
class LocalSource:
    """One data owner's rows, labelled in the run's class order.

    Attributes:
        path: The data path as given.
        rows: ``datasets.Dataset`` with the run's image column (``Image``) and label column
            (``ClassLabel`` of ``class_names``), unreadable images left out, in source order.
        class_names: The run's class names (label ``i`` is ``class_names[i]``).
        unreadable: The images that did not decode and were skipped (a file path, or
            ``row N`` for an image stored inside a parquet file).
        num_read: Rows found before the unreadable ones were skipped.
        label_column: The label column of ``rows`` (``data.label_column``).
    """

    path: str
    rows: object
    class_names: tuple[str, ...]
    unreadable: tuple[str, ...]
    num_read: int
    label_column: str = "label"

    @property
    def num_samples(self) -> int:
        """Usable rows (what FedAvg weighs this owner by when all of them train)."""
        return len(self.rows)

    def labels(self) -> np.ndarray:
        """Every row's class index in the run's order, int64."""
        return np.asarray(self.rows[self.label_column], dtype=np.int64)

    def summary(self) -> str:
        """One line for the node's log: how many images, how many skipped and which."""
        line = f"{self.path}: {self.num_samples} images"
        if self.unreadable:
            shown = ", ".join(self.unreadable[:MAX_LISTED])
            more = "" if len(self.unreadable) <= MAX_LISTED else ", ..."
            line += f", {len(self.unreadable)} unreadable skipped ({shown}{more})"
        return line


def source_counts(source: LocalSource) -> tuple[int, np.ndarray]:
    """What a node would report about its data: ``(num_samples, label_counts)``.

    ``label_counts[c]`` counts the rows of class ``class_names[c]`` (int64, one entry per run
    class, zeros for classes the owner lacks); it leaves the node only if its operator allows.
    """
    counts = np.bincount(source.labels(), minlength=len(source.class_names)).astype(np.int64)
    return source.num_samples, counts


def normalise_class_name(name: str) -> str:
    """Class names compare with underscores as spaces (``golden_retriever`` is
    ``golden retriever``), as :func:`~flora_lightning.data.splits.resolve_class_names` shows them."""
    return str(name).replace("_", " ").strip()


def load_local_source(
    path: str,
    class_names: Sequence[str],
    image_column: str = "image",
    label_column: str = "label",
    max_unreadable_fraction: float = 0.0,
    field: str = "data-path",
) -> LocalSource:
    """Load one data owner's data from ``path`` and label it in the run's class order.

    Args:
        path: ``DIR`` (imagefolder), ``FILE.parquet`` / a glob, or ``hub:ID[:SPLIT]``.
        class_names: The run's classes (``data.class_names``), in label order.
        image_column: ``data.image_column``: the image column of parquet and hub data (an
            imagefolder's ``image`` column is renamed to it).
        label_column: ``data.label_column``: the label column of parquet and hub data (an
            imagefolder's folder-name ``label`` is renamed to it).
        max_unreadable_fraction: ``data.max_unreadable_fraction``: images that do not decode
            are skipped and counted; more than this share of them refuses the data.
        field: Where ``path`` came from (``data.partition.client_dirs[2]``, a node's
            ``data-path``), named in every error.

    Raises:
        LocalSourceError: naming ``field`` and ``path``: no such path, an empty folder,
            missing columns (and the fields that name them), labels the run does not know
            (listed), too many unreadable images.
    """
    names = [normalise_class_name(n) for n in class_names]
    where = f"{field}={path!r}"
    try:
        spec = check_source_exists(path, field)
    except ValueError as err:
        raise LocalSourceError(str(err)) from err
    rows = _load(spec, where)
    rows = _columns(rows, spec, where, image_column, label_column)
    labels = _labels_in_run_order(rows, label_column, names, where)
    rows = _with_run_labels(rows, image_column, label_column, labels, names, where)
    bad_rows, unreadable = _unreadable(rows, image_column)
    num_read = len(rows)
    if unreadable:
        share = len(unreadable) / num_read
        if share > max_unreadable_fraction or len(unreadable) == num_read:
            shown = ", ".join(unreadable[:MAX_LISTED])
            raise LocalSourceError(
                f"{where}: {len(unreadable)} of {num_read} images cannot be read ({shown}"
                f"{', ...' if len(unreadable) > MAX_LISTED else ''}); that is more than "
                f"data.max_unreadable_fraction={max_unreadable_fraction}. Replace or delete "
                "them, or raise data.max_unreadable_fraction to skip them."
            )
        rows = rows.select(np.setdiff1d(np.arange(num_read), bad_rows))
    source = LocalSource(path, rows, tuple(names), tuple(unreadable), num_read, label_column)
    if unreadable:  # said on the node's console and in the run's log, never silent
        warnings.warn(f"{field}: {source.summary()}", stacklevel=2)
    return source


def _load(spec: SourceSpec, where: str):
    """The source's one split as a ``datasets.Dataset``."""
    import datasets

    from flora_lightning.data.source import DataFileError, DatasetNotAvailableError, load_source

    if spec.kind == "imagefolder":
        folder = Path(spec.location)
        if not any(p.is_file() for p in folder.rglob("*")):
            raise LocalSourceError(
                f"{where}: the folder is empty; put the images in one sub-folder per class "
                "(DIR/<class name>/<image>)."
            )
        loose = sorted(
            p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if loose:
            raise LocalSourceError(
                f"{where}: files directly in the folder ({', '.join(loose[:MAX_LISTED])}) have "
                "no class: an imagefolder holds its images in one sub-folder per class "
                "(DIR/<class name>/<image>)."
            )
        try:  # drop_labels=False: a site holding one class keeps its label too
            loaded = datasets.load_dataset("imagefolder", data_dir=str(folder), drop_labels=False)
        except (FileNotFoundError, ValueError) as err:  # datasets: no image files found
            raise LocalSourceError(
                f"{where}: no images found ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); an imagefolder holds "
                "images in one sub-folder per class (DIR/<class name>/<image>)."
            ) from err
        return _one_split(loaded, "train", where)
    try:
        if spec.kind == "parquet":
            return _one_split(load_source("parquet", data_files=spec.location), "train", where)
        loaded = load_source(spec.location)
    except (DatasetNotAvailableError, DataFileError) as err:  # their message names data.dataset
        raise LocalSourceError(f"{where}: {str(err).removeprefix('data.dataset: ')}") from err
    if spec.split not in loaded:
        raise LocalSourceError(
            f"{where}: the dataset has no split {spec.split!r}; its splits are "
            f"{list(loaded)} (write hub:{spec.location}:SPLIT)."
        )
    return loaded[spec.split]


def _one_split(loaded, split: str, where: str):
    if len(loaded) == 1:
        return next(iter(loaded.values()))
    if split in loaded:
        return loaded[split]
    raise LocalSourceError(
        f"{where}: the data has the splits {list(loaded)}; give one data owner's data, one "
        "split (e.g. the folder of one split)."
    )


def _columns(rows, spec: SourceSpec, where: str, image_column: str, label_column: str):
    """Only the image and label columns, under the run's names."""
    if spec.kind == "imagefolder":
        if "label" not in rows.column_names:
            raise LocalSourceError(
                f"{where}: the images have no class: an imagefolder holds them in one "
                "sub-folder per class (DIR/<class name>/<image>), not directly in DIR."
            )
        renames = {"image": image_column, "label": label_column}
        rows = rows.select_columns(["image", "label"])
        if renames["image"] != "image" or renames["label"] != "label":
            rows = rows.rename_columns({k: v for k, v in renames.items() if k != v})
        return rows
    missing = [c for c in (image_column, label_column) if c not in rows.column_names]
    if missing:
        raise LocalSourceError(
            f"{where}: no column {', '.join(repr(c) for c in missing)} (the columns are "
            f"{rows.column_names}); the run reads images from data.image_column="
            f"{image_column!r} and labels from data.label_column={label_column!r}: set those "
            "fields to this data's column names, or rename the columns."
        )
    return rows.select_columns([image_column, label_column])


def _labels_in_run_order(rows, label_column: str, names: list[str], where: str) -> np.ndarray:
    """Every row's label as an index into ``names``, matched by class name.

    A ``ClassLabel`` column's names and a string column's values are matched by name; a plain
    integer column (no names) is taken as indices in ``data.class_names`` order.
    """
    feature = rows.features[label_column]
    values = rows[label_column]
    own = getattr(feature, "names", None)
    if own is None and getattr(feature, "dtype", None) in ("string", "large_string"):
        own = sorted(set(values))
        position = {name: i for i, name in enumerate(own)}
        values = [position[v] for v in values]
    if own is None:
        labels = np.asarray(values, dtype=np.int64)
        bad = sorted(set(labels[(labels < 0) | (labels >= len(names))].tolist()))
        if bad:
            raise LocalSourceError(
                f"{where}: the label column {label_column!r} has no class names and holds "
                f"labels {bad[:MAX_LISTED]} outside 0..{len(names) - 1} (data.class_names has "
                f"{len(names)} classes); store class names (a ClassLabel or string column) or "
                "labels in data.class_names order."
            )
        return labels
    index = {name: i for i, name in enumerate(names)}
    own_norm = [normalise_class_name(n) for n in own]
    present = sorted(set(np.asarray(values, dtype=np.int64).tolist()))
    unknown = [own_norm[i] for i in present if own_norm[i] not in index]
    if unknown:
        lower = {n.lower(): n for n in names}
        close = [
            f"{u!r} (data.class_names has {lower[u.lower()]!r})"
            for u in unknown
            if u.lower() in lower
        ]
        hint = f" Case differs for {', '.join(close[:MAX_LISTED])}." if close else ""
        raise LocalSourceError(
            f"{where}: {len(unknown)} label(s) the run does not know: "
            f"{unknown[:MAX_LISTED]}{' ...' if len(unknown) > MAX_LISTED else ''}; "
            f"data.class_names is {names}. Add them to data.class_names (every data owner "
            f"must use the same list) or remove those images.{hint}"
        )
    mapping = np.array([index.get(n, -1) for n in own_norm], dtype=np.int64)
    return mapping[np.asarray(values, dtype=np.int64)]


def _with_run_labels(
    rows, image_column: str, label_column: str, labels, names: list[str], where: str
):
    """The rows with ``labels`` as a ``ClassLabel(names)`` column and an ``Image`` column."""
    import datasets

    features = datasets.Features(
        {image_column: datasets.Image(), label_column: datasets.ClassLabel(names=names)}
    )
    rows = rows.remove_columns(label_column).add_column(label_column, labels.tolist())
    try:  # an Image column, or image bytes / paths (a {bytes, path} struct) cast to one
        return rows.cast(features)
    except (TypeError, ValueError, NotImplementedError) as err:  # pyarrow's cast errors too
        raise LocalSourceError(
            f"{where}: the image column {image_column!r} holds "
            f"{rows.features[image_column]}, not images (image files, bytes or "
            "{bytes, path} records); set data.image_column to the column of the images."
        ) from err


def _unreadable(rows, image_column: str) -> tuple[np.ndarray, list[str]]:
    """Rows whose image does not decode: ``(row indices, names)`` (a path, or ``row N``)."""
    import datasets
    from PIL import Image

    raw = rows.cast_column(image_column, datasets.Image(decode=False))
    bad, names = [], []
    start = 0
    for batch in raw.iter(batch_size=256):
        for offset, value in enumerate(batch[image_column]):
            data, path = (value or {}).get("bytes"), (value or {}).get("path")
            try:
                with Image.open(io.BytesIO(data) if data else path) as image:
                    image.load()
            except Exception:  # PIL raises UnidentifiedImageError, OSError, ValueError, ...
                bad.append(start + offset)
                names.append(str(path) if path else f"row {start + offset}")
        start += len(batch[image_column])
    return np.asarray(bad, dtype=np.int64), names
