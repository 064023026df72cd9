"""LLaVA: the builder and facade (``model.py``), data (``data.py``), conversation templates
(``templates.py``), projector (``projector.py``), vision tower (``vision.py``), generation (``generate.py``),
the tiny tokenizer's build tool (``tokenizer_tiny.py``) and its demo stages (``demo.py``).

The public names of ``model.py`` are also reachable here (``mmfast.models.llava.Llava``, as before the
split); they load ``model.py`` on first use
(:mod:`mmfast.models._facade`), so importing a sibling module stays cheap.
"""
from mmfast.models._facade import forward_names

__getattr__ = forward_names(__name__, __file__)
