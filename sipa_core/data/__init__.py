"""Data for the pipeline: sources of raw images and the ``prepare`` stage."""

from sipa_core.data.prepare import (
    PREPARE_SCHEMA,
    PreparedData,
    channel_stats,
    load_prepared,
    prepare,
    split_train_val,
    stratified_counts,
)
from sipa_core.data.sources import (
    SOURCES,
    RawData,
    SourcePlan,
    decode_images,
    load_source,
    plan_source,
    scan_imagefolder,
)

__all__ = [
    "PREPARE_SCHEMA",
    "PreparedData",
    "RawData",
    "SOURCES",
    "SourcePlan",
    "channel_stats",
    "decode_images",
    "load_prepared",
    "load_source",
    "plan_source",
    "prepare",
    "scan_imagefolder",
    "split_train_val",
    "stratified_counts",
]
