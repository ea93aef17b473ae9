"""Lightning callbacks: the orchestration of a run (exporting the model, and later self-play).

Shipped as ``sppo_lightning.callbacks``; the folder sits at the top of the repository so that a
newcomer finds the orchestration next to the package, not inside it.
"""
