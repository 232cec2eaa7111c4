"""Run under torchrun by test_distributed.py: trains, then saves this rank's weights for the test to compare."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from cifar_cli.config.settings import load_settings, parse_set_options
from cifar_cli.train.run import Trainer

if __name__ == "__main__":
    weights_dir = Path(sys.argv[1])
    trainer = Trainer(load_settings(None, parse_set_options(sys.argv[2:])))
    result = trainer.run()
    torch.save(trainer.parts.model.state_dict(), weights_dir / f"rank{os.environ['RANK']}.pt")
    (weights_dir / f"rank{os.environ['RANK']}.epochs").write_text(str(len(result.history)))
