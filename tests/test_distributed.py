"""Data-parallel training with torchrun (gloo, 2 CPU processes) against one process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import tiny_data, tiny_model
from sipa_core.train import configure_model, default_recipe, fit

HERE = Path(__file__).resolve().parent
pytestmark = pytest.mark.slow  # torchrun: two training processes


def test_two_processes_train_like_one_with_ghost_batchnorm(tmp_path):
    """Global batch 32 over 2 processes = one process with ghost BatchNorm of 16:
    the same augmented, mixed batches, the same averaged gradients, the same weights and
    BatchNorm running statistics."""
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(HERE / "ddp_fit.py"), str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    ddp = torch.load(out, weights_only=True)
    assert ddp["world"] == 2

    model = tiny_model(dropout=0.0, drop_connect=0.0)
    recipe = default_recipe(epochs=2, batch_size=32, lr=0.1, mixup_alpha=0.5, device="cpu", ghost_batch=16)
    single = fit(configure_model(model, recipe), tiny_data(), recipe, val_split=None, progress=False)
    for (name, a) in model.state_dict().items():
        if "num_batches" in name:
            continue  # counts updates; not used with a momentum
        assert torch.allclose(a, ddp["model"][name], atol=2e-5, rtol=1e-4), name
    for a, b in zip(single.history, ddp["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)


def test_batch_must_divide_over_processes(tmp_path):
    script = tmp_path / "odd.py"
    script.write_text(
        "import sys; sys.path.insert(0, %r)\n"
        "from helpers import tiny_data, tiny_model\n"
        "from sipa_core.distributed import init_from_env\n"
        "from sipa_core.errors import SipaError\n"
        "from sipa_core.train import default_recipe, fit\n"
        "init_from_env()\n"
        "try:\n"
        "    fit(tiny_model(), tiny_data(), default_recipe(batch_size=15, device='cpu'), progress=False)\n"
        "except SipaError as e:\n"
        "    print('ERR', e)\n" % str(HERE))
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script)], capture_output=True, text=True, timeout=300)
    assert "recipe.batch_size: 15 is not divisible by the 2 data-parallel processes" in p.stdout, p.stderr[-2000:]
