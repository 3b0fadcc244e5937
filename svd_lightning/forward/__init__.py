"""The model-side forward: both distributions from one peft model, with the forward mode decided once
(:mod:`.rows`), the adapter switched off for the pre-trained one (:mod:`.adapter`), the split's shared
prefix as an explicit cache (:mod:`.prefix`) and the encoders that share a batch's repeated work
(:mod:`.encoders`)."""

from svd_lightning.forward.adapter import adapter_disabled, adapter_fingerprint, model_with_adapter
from svd_lightning.forward.encoders import distinct_rows, encoder_for
from svd_lightning.forward.prefix import PrefixCache
from svd_lightning.forward.rows import BASE, PAIRED, WARM, Rows, one_forward_unsupported, resolve_forward_mode, warm_and_base

__all__ = ["BASE", "PAIRED", "WARM", "PrefixCache", "Rows", "adapter_disabled", "adapter_fingerprint", "distinct_rows",
           "encoder_for", "model_with_adapter", "one_forward_unsupported", "resolve_forward_mode", "warm_and_base"]
