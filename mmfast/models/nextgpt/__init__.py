"""NExT-GPT: the builder and model (``model.py``), encoders, decoders, data, generation and chat loop
(``generate.py``) and its demo stages (``demo.py``).

The public names of ``model.py`` are also reachable here (``mmfast.models.nextgpt.build_nextgpt``, as before the
split); they load ``model.py`` on first use
(:mod:`mmfast.models._facade`), so importing a sibling module stays cheap.
"""
from mmfast.models._facade import forward_names

__getattr__ = forward_names(__name__, __file__)
