"""Datasets by name (see :mod:`dfkd_common.data.datasets`)."""

from dfkd_common.data.datasets import DATASETS, ArraySplit, DatasetInfo, get_dataset, load_split

__all__ = ["DATASETS", "ArraySplit", "DatasetInfo", "get_dataset", "load_split"]
