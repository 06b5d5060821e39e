"""vitpipe's model zoo: pure ``nn.Module`` code, registered with timm.

Importing this package imports every architecture module, and each registers its variants, so that
``timm.create_model(name)`` and :func:`model.factory.create_model` build them. Nothing here imports
torch.distributed, DeepSpeed, accelerate or MLflow (distributed wrapping happens in :mod:`pipeline`), nor
matplotlib (pictures are in :mod:`model.viz`), nor the published-numbers table :mod:`model.zoo`.
"""

from model import deit, filtervit, structvit, swin, vit_tiny  # noqa: F401  (each module registers its variants)
from model.registry import is_model, list_models, register_model

__all__ = ["create_model", "is_model", "list_models", "register_model"]


def create_model(name: str, **kwargs):  # noqa: ANN201 - thin re-export, see model.factory.create_model
    """Builds a registered model; see :func:`model.factory.create_model`."""
    from model.factory import create_model as _create_model

    return _create_model(name, **kwargs)
