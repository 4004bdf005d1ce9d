"""uncurl: make a smaller sparse Mixture-of-Experts model for one task.

The package reads as its data flow: ``load`` -> ``profile`` -> ``cluster`` -> ``merge`` ->
``save`` -> ``report``, with ``adapters`` (where each MoE family keeps its router and experts)
and ``tasks`` (what a task's data looks like) beside it, ``pipeline`` calling the steps in order,
and ``cli`` a thin layer on top.
"""

__version__ = "0.1.0"
DISTRIBUTION = "uncurl-moe"  # the PyPI name: pip install uncurl-moe (PyPI's "uncurl" is another project)
