"""Dataset adapters, one module per dataset, registered by name (``--dataset NAME``); see :mod:`.base`.

Importing this package registers the built-in adapters; a new dataset is one module here plus its import below.
"""

from comoto_cli.data.adapters import bcs_dbt, cbis_ddsm, inbreast, jsonl, manifest, omidb, vindr  # noqa: F401 - importing registers them
from comoto_cli.data.adapters.base import (
    DatasetAdapter,
    ImageAdapter,
    PixelSource,
    VolumeAdapter,
    adapter_for,
    default_dataset,
    get_adapter,
    register,
    registered,
)

__all__ = ["DatasetAdapter", "ImageAdapter", "PixelSource", "VolumeAdapter", "adapter_for", "default_dataset",
           "get_adapter", "register", "registered"]
