"""Run by test_distributed.py under torchrun: train the tiny model data-parallel; rank 0 saves the result."""

import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from helpers import tiny_data, tiny_model  # noqa: E402

from sipa_core.distributed import init_from_env, rank_and_world  # noqa: E402
from sipa_core.train import default_recipe, fit  # noqa: E402

if __name__ == "__main__":
    assert init_from_env()
    model = tiny_model(dropout=0.0, drop_connect=0.0)
    recipe = default_recipe(epochs=2, batch_size=32, lr=0.1, mixup_alpha=0.5, device="cpu")
    result = fit(model, tiny_data(), recipe, val_split=None, progress=False,
                 state_path=sys.argv[1] + ".state")
    if rank_and_world()[0] == 0:
        torch.save({"model": model.state_dict(), "history": result.history, "world": rank_and_world()[1]},
                   sys.argv[1])
