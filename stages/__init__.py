"""The recipes: one module per command, each owning its loop in setup / run / finish sections.

``cache_teacher`` (stage one), ``train_student`` (stage two), ``evaluate`` and ``export``. Recipes never import
each other; what two of them share lives in the library (:mod:`kd`). The stages talk only through the cache
(:mod:`cache_schema`) and the run directories they write.
"""
