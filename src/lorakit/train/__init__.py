"""Training: the SFT and DPO loops, their arguments and the loss functions they share."""

from lorakit.train.args import DPOArgs, SFTArgs, load_args
from lorakit.train.dpo import train_dpo
from lorakit.train.losses import dpo_loss, masked_ce_loss, sequence_logps
from lorakit.train.sft import TrainResult, train_sft

__all__ = ["DPOArgs", "SFTArgs", "TrainResult", "dpo_loss", "load_args", "masked_ce_loss", "sequence_logps",
           "train_dpo", "train_sft"]
