"""DVC stage ``prepare``: decode the data source once into train/val/test uint8 tensors."""

from sipa_core.cli_stage import stage_main
from sipa_core.data import PREPARE_SCHEMA, prepare
from sipa_core.params import read_section

if __name__ == "__main__":
    stage_main(__doc__, lambda path: read_section(path, "prepare", PREPARE_SCHEMA), prepare,
               lambda cfg, m: f"prepare: {m['train_images']} train / {m['val_images']} val / {m['test_images']} test "
                              f"images, {m['num_classes']} classes, {m['image_height']}x{m['image_width']} -> {cfg['out']}")
