"""The training runtime: config, loaders, engine seam, trainer, checkpoints and tracking.

The only package that knows about ranks, accelerate/DeepSpeed and MLflow.
"""
