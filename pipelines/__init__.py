"""Frame-level stages: pure functions of arrays and metadata, shared by the daemon and training.

Nothing here touches a database or the network (DESIGN.md §2): ``daemon`` and ``training`` call
these functions exactly as they are, so a model is trained on frames prepared by the same code
that prepares them in production.
"""
