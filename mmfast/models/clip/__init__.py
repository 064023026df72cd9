"""CLIP: open_clip models built from mmfast's presets, with mmfast's kernels (``model.py``) and its demo
stages (``demo.py``).

The public names of ``model.py`` are also reachable here (``mmfast.models.clip.create_model``, as before the
split); they load ``model.py`` on first use
(:mod:`mmfast.models._facade`), so importing a sibling module stays cheap.
"""
from mmfast.models._facade import forward_names

__getattr__ = forward_names(__name__, __file__)
