"""Training: phantom and archive datasets, fine-tuning with the papers' recipes, the demo model.

Uses ``pipelines`` for every frame it prepares (the daemon's own clean and preprocess code) and, of
``daemon``, only the DB schema and the model registry (DESIGN.md §2).
"""
