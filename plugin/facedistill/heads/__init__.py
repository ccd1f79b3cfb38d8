from facedistill.heads.margin import HEADS, MarginHead, margin_target_logit

__all__ = ["HEADS", "MarginHead", "margin_target_logit"]
