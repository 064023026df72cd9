"""flash-attn 2.8's public functions on mmfast's kernels: ``import mmfast.compat.flash_attn as flash_attn``
(or ``from mmfast.compat.flash_attn import ...``) in place of ``flash_attn``.

Same names, positional order, defaults and returns as flash-attn 2.8; mmfast's extensions (``backend``,
``prefix_len(s)``, ``dropout_seed``, ``return_lse``) are keyword-only. What differs is listed in the README
("Porting from flash-attn") and in :mod:`mmfast.ops.attention`.
"""
from mmfast.compat.flash_attn import bert_padding, flash_attn_interface
from mmfast.compat.flash_attn.flash_attn_interface import *  # its __all__: flash-attn's seven functions

__version__ = "2.8.3"  # the flash-attn interface this namespace follows

__all__ = ["bert_padding", "flash_attn_interface"]
__all__ += flash_attn_interface.__all__
