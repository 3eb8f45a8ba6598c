"""Loading the image dataset with HF ``datasets``: hub id, imagefolder, parquet, local folder.

``flora-offline/digits`` resolves to parquet files built locally, then goes through the same
``load_dataset`` call as any user dataset.
"""

from __future__ import annotations

from pathlib import Path

from flora_lightning.clip.hub import NotAvailableError, dataset_path

OFFLINE_HINT = (
    "No access to the Hugging Face hub here? Download it once where you have internet "
    "(`hf download {name} --repo-type dataset --local-dir DIR`) and pass --data.dataset DIR, "
    "or point at local files with --data.dataset imagefolder --data.data_dir DIR or "
    "--data.dataset parquet --data.data_files '{{train: a.parquet, test: b.parquet}}'; "
    "the built-in offline dataset is flora-offline/digits."
)


class DatasetNotAvailableError(NotAvailableError):
    """The dataset could not be loaded from the hub or the given files."""


class DataFileError(RuntimeError):
    """A local data file exists but cannot be read (corrupt, truncated, not that format)."""


def not_available_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "this dataset is not here": no network, offline mode, an
    unknown hub id or revision, a gated repo, missing files. Anything else is another failure
    (a corrupt file, a bug) and must keep its own type and message."""
    import huggingface_hub.errors as hub_errors

    errors: list[type[BaseException]] = [ConnectionError, TimeoutError, FileNotFoundError]
    for name in (
        "RepositoryNotFoundError",
        "RevisionNotFoundError",
        "GatedRepoError",
        "LocalEntryNotFoundError",
        "OfflineModeIsEnabled",
    ):
        if hasattr(hub_errors, name):
            errors.append(getattr(hub_errors, name))
    return tuple(errors)


def _local_files(value) -> list[Path]:
    if value is None:
        return []
    if isinstance(value, str | Path):
        path = Path(value)
        return sorted(path.rglob("*")) if path.is_dir() else [path]
    if isinstance(value, dict):
        return [p for v in value.values() for p in _local_files(v)]
    return [p for v in value for p in _local_files(v)]


def unreadable_parquet_files(dataset: str, data_dir, data_files) -> list[tuple[Path, str]]:
    """Local ``.parquet`` files among the dataset's sources whose footer cannot be read:
    ``[(path, reason)]``."""
    import pyarrow.parquet

    candidates = _local_files(data_files) + _local_files(data_dir)
    if Path(dataset).is_dir():
        candidates += _local_files(dataset)
    bad = []
    for path in candidates:
        if path.suffix == ".parquet" and path.is_file():
            try:
                pyarrow.parquet.read_schema(path)
            except Exception as err:  # pyarrow's errors: ArrowInvalid, OSError, ...
                bad.append((path, f"{type(err).__name__}: {str(err).splitlines()[0]}"))
    return bad


def load_source(
    dataset: str,
    subset: str | None = None,
    data_dir: str | None = None,
    data_files: str | list[str] | dict[str, str | list[str]] | None = None,
):
    """``datasets.load_dataset`` with the offline names resolved and failures made clear.

    Returns:
        A ``datasets.DatasetDict``.

    Raises:
        DatasetNotAvailableError: naming ``data.dataset``, what was tried, and the way out.
        DataFileError: a local parquet file is damaged (naming it).
        Exception: any other failure, unchanged.
    """
    import datasets

    from flora_lightning.offline.digits import OFFLINE_DIGITS, digits_data_files

    if dataset == OFFLINE_DIGITS:
        dataset, data_files = "parquet", digits_data_files()
    try:
        loaded = datasets.load_dataset(
            dataset_path(dataset), subset, data_dir=data_dir, data_files=data_files
        )
    except not_available_errors() as err:
        hint = OFFLINE_HINT.format(name=dataset)
        if Path(dataset).exists() or data_dir or data_files:
            hint = "Check the folder/files exist and hold images or parquet with the columns."
        message = str(err).splitlines()[0] if str(err) else ""
        raise DatasetNotAvailableError(
            f"data.dataset: could not load dataset '{dataset}' ({type(err).__name__}: "
            f"{message}). {hint}"
        ) from err
    except Exception as err:  # anything else keeps its own type; name a damaged file if any
        damaged = unreadable_parquet_files(dataset, data_dir, data_files)
        if not damaged:
            raise
        path, reason = damaged[0]
        raise DataFileError(
            f"data: {path} is not a readable parquet file ({reason}); it is corrupted or "
            f"truncated: replace or re-download it ({len(damaged)} unreadable file(s) in all)."
        ) from err
    if not isinstance(loaded, datasets.DatasetDict):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded
