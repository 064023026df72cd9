"""Drop-in namespaces for other libraries' interfaces: port code by changing one import line.

* :mod:`mmfast.compat.flash_attn` — flash-attn 2.8 (``from flash_attn import flash_attn_func`` →
  ``from mmfast.compat.flash_attn import flash_attn_func``), with ``bert_padding`` and
  ``flash_attn_interface`` submodules.
"""
