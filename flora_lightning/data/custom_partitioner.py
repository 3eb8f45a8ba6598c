"""Any flwr-datasets ``Partitioner`` subclass, named in the config by its class path.

``data.partition.partitioner: {class_path: my.module.MyPartitioner, init_args: {...}}`` selects
it; a new partitioner is one new class and no edit to this package.
"""

import importlib
import inspect

from flwr_datasets.partitioner import Partitioner


def partitioner_class(spec: dict) -> type[Partitioner]:
    """The ``Partitioner`` subclass named by ``data.partition.partitioner``, checked.

    Args:
        spec: ``{"class_path": "module.Class", "init_args": {...}}`` (``init_args`` optional).

    Raises:
        ValueError: If the entry is malformed, the class cannot be imported or is not a
            ``flwr_datasets.partitioner.Partitioner`` subclass; the message names the field.
    """
    p = "data.partition.partitioner"
    if not isinstance(spec, dict) or not isinstance(spec.get("class_path"), str):
        raise ValueError(
            f"{p} needs a class_path: {{class_path: my.module.MyPartitioner, init_args: {{}}}} "
            f"(got {spec!r})"
        )
    unknown = sorted(set(spec) - {"class_path", "init_args"})
    if unknown:
        raise ValueError(f"{p} takes only class_path and init_args (got {', '.join(unknown)})")
    init_args = spec.get("init_args") or {}
    if not isinstance(init_args, dict):
        raise ValueError(f"{p}.init_args must be a mapping (got {init_args!r})")
    if "num_partitions" in init_args:
        raise ValueError(f"{p}.init_args.num_partitions is set from data.partition.num_clients")
    if "partition_by" in init_args:
        raise ValueError(f"{p}.init_args.partition_by is set by flora (the label column)")
    path = spec["class_path"]
    module_name, _, name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ValueError(f"{p}.class_path {path!r} cannot be imported: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, Partitioner)):
        raise ValueError(
            f"{p}.class_path {path!r} is not a flwr_datasets.partitioner.Partitioner subclass"
        )
    return cls


def build_partitioner(spec: dict, num_partitions: int, partition_by: str, seed: int) -> Partitioner:
    """The partitioner of ``spec``, given ``num_partitions`` and, where it takes them,
    ``partition_by`` and ``seed`` (unless its ``init_args`` set them).

    Raises:
        ValueError: As :func:`partitioner_class`, or if the class rejects its arguments.
    """
    cls = partitioner_class(spec)
    kwargs = dict(spec.get("init_args") or {})
    params = inspect.signature(cls).parameters
    takes_any = any(v.kind is inspect.Parameter.VAR_KEYWORD for v in params.values())
    for key, value in (("partition_by", partition_by), ("seed", seed)):
        if key not in kwargs and (key in params or takes_any):
            kwargs[key] = value
    try:
        return cls(num_partitions=num_partitions, **kwargs)
    except TypeError as err:
        raise ValueError(
            f"data.partition.partitioner {spec['class_path']!r}: {err}; "
            "check data.partition.partitioner.init_args"
        ) from err
