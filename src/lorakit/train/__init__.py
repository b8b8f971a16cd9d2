"""Training: loss functions (the SFT / DPO loops are added next to them)."""

from lorakit.train.losses import dpo_loss, masked_ce_loss, sequence_logps

__all__ = ["dpo_loss", "masked_ce_loss", "sequence_logps"]
