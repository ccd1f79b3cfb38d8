from facedistill.heads.margin import MarginHead, margin_target_logit

__all__ = ["MarginHead", "margin_target_logit"]
