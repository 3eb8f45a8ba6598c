"""Loading the image dataset with HF ``datasets``: hub id, imagefolder, parquet, local folder.

``flora-offline/digits`` resolves to parquet files built locally, then goes through the same
``load_dataset`` call as any user dataset.
"""

from __future__ import annotations

from pathlib import Path

from flora_lightning.hub import NotAvailableError, dataset_path

OFFLINE_HINT = (
    "No access to the Hugging Face hub here? Download it once where you have internet "
    "(`hf download {name} --repo-type dataset --local-dir DIR`) and pass --data.dataset DIR, "
    "or point at local files with --data.dataset imagefolder --data.data_dir DIR or "
    "--data.dataset parquet --data.data_files '{{train: a.parquet, test: b.parquet}}'; "
    "the built-in offline dataset is flora-offline/digits."
)


class DatasetNotAvailableError(NotAvailableError):
    """The dataset could not be loaded from the hub or the given files."""


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
    """
    import datasets

    from flora_lightning.offline.digits import OFFLINE_DIGITS, digits_data_files

    if dataset == OFFLINE_DIGITS:
        dataset, data_files = "parquet", digits_data_files()
    try:
        loaded = datasets.load_dataset(
            dataset_path(dataset), subset, data_dir=data_dir, data_files=data_files
        )
    except Exception as err:  # datasets raises many types (FileNotFound, ConnectionError, ...)
        hint = OFFLINE_HINT.format(name=dataset)
        if Path(dataset).exists() or data_dir or data_files:
            hint = "Check the folder/files exist and hold images or parquet with the columns."
        message = str(err).splitlines()[0] if str(err) else ""
        raise DatasetNotAvailableError(
            f"data.dataset: could not load dataset '{dataset}' ({type(err).__name__}: "
            f"{message}). {hint}"
        ) from err
    if not isinstance(loaded, datasets.DatasetDict):
        loaded = datasets.DatasetDict({"train": loaded})
    return loaded
