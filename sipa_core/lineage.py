"""A checkpoint's lineage: which splits of which prepared data set the model
(and every model it came from) trained on. Every stage writes it and carries
it forward, and a stage refuses to make a choice (a pruning round, an exit
threshold) on a split its input model trained on."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from sipa_core.errors import SipaError


@dataclass(frozen=True)
class Lineage:
    """The prepared data set (its ``source`` record) and the splits a model trained on."""

    data: dict
    splits: tuple[str, ...]

    def as_dict(self) -> dict:
        return {"data": dict(self.data), "splits": list(self.splits)}

    @classmethod
    def from_dict(cls, raw, path) -> Lineage:
        """The stored record, checked: a malformed one is one line naming the checkpoint."""
        if not (isinstance(raw, dict) and isinstance(raw.get("data"), dict) and isinstance(raw.get("splits"), list)
                and all(isinstance(s, str) for s in raw["splits"])):
            raise SipaError(f"{path}: malformed lineage record (expected data and a list of splits)")
        return cls(dict(raw["data"]), tuple(raw["splits"]))


def lineage_record(data, splits) -> Lineage:
    """The lineage of a model trained on ``splits`` of the prepared ``data``."""
    return Lineage(dict(data.source), tuple(sorted(set(splits))))


def input_lineage(lineage: Lineage | None, data, where: str, path) -> Lineage:
    """The input checkpoint's lineage, checked against the data this stage uses.

    A checkpoint without one (written elsewhere, or by an older version) is
    taken as trained on ``train`` only, said on stderr."""
    if lineage is None:
        print(f"{where}: {path} records no lineage; taken as trained on the train split only", file=sys.stderr)
        return lineage_record(data, ["train"])
    if lineage.data != dict(data.source):
        raise SipaError(f"{where}: {path} was trained on another prepared data set ({lineage.data}); "
                        f"this stage reads {data.source}")
    return lineage


def refuse_trained_split(split: str, lineage: Lineage, key: str, path) -> None:
    """A choice on ``split`` is refused when the input model trained on it (one line, the keys named)."""
    if split in lineage.splits:
        raise SipaError(f"{key}: the {split} split chooses here, but {path} trained on "
                        f"{'+'.join(lineage.splits)} (its lineage); choose on a split no stage trains on: "
                        f"drop improve's no_validation (improve.adopt) or prepare a split that training "
                        f"never sees")
