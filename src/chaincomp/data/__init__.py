"""Data layer: sources and formats, the decoded cache, tasks' batches on the device."""

from chaincomp.data.datamodule import ChainDataModule, DataConfig
from chaincomp.data.formats import RawDataset
from chaincomp.data.loader import Augment, DeviceBatches
from chaincomp.data.sources import SOURCES, load_raw

__all__ = [
    "SOURCES",
    "Augment",
    "ChainDataModule",
    "DataConfig",
    "DeviceBatches",
    "RawDataset",
    "load_raw",
]
