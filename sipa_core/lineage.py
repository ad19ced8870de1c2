"""A checkpoint's lineage: which splits of which prepared data set the model
(and every model it came from) trained on. Every stage writes it and carries
it forward, and a stage refuses to make a choice (a pruning round, an exit
threshold) on a split its input model trained on."""

from __future__ import annotations

import sys

from sipa_core.errors import SipaError


def lineage_record(data, splits) -> dict:
    """The lineage of a model trained on ``splits`` of the prepared ``data``."""
    return {"data": dict(data.source), "splits": sorted(set(splits))}


def input_lineage(meta: dict, data, where: str, path) -> dict:
    """The input checkpoint's lineage, checked against the data this stage uses.

    A checkpoint without one (written elsewhere, or by an older version) is
    taken as trained on ``train`` only, said on stderr."""
    record = meta.get("lineage")
    if not isinstance(record, dict) or not isinstance(record.get("splits"), list):
        print(f"{where}: {path} records no lineage; taken as trained on the train split only", file=sys.stderr)
        return lineage_record(data, ["train"])
    if record.get("data") != dict(data.source):
        raise SipaError(f"{where}: {path} was trained on another prepared data set ({record.get('data')}); "
                        f"this stage reads {data.source}")
    return record


def refuse_trained_split(split: str, record: dict, key: str, path) -> None:
    """A choice on ``split`` is refused when the input model trained on it (one line, the keys named)."""
    if split in record["splits"]:
        raise SipaError(f"{key}: the {split} split chooses here, but {path} trained on "
                        f"{'+'.join(record['splits'])} (its lineage); choose on a split no stage trains on: "
                        f"drop improve's no_validation (improve.adopt) or prepare a split that training "
                        f"never sees")
