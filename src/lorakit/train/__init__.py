"""Training: the SFT and DPO loops (they train the model they are given), the recipes that load a model from a
config and call them, and their arguments. The loss math is in :mod:`lorakit.losses`."""

from lorakit.train.args import DPOArgs, SFTArgs, load_args
from lorakit.train.common import TrainResult
from lorakit.train.dpo import train_dpo
from lorakit.train.recipe import run_dpo, run_sft
from lorakit.train.sft import train_sft

__all__ = ["DPOArgs", "SFTArgs", "TrainResult", "load_args", "run_dpo", "run_sft", "train_dpo", "train_sft"]
