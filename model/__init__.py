"""vitpipe's model zoo: pure ``nn.Module`` code, registered with timm.

Importing this package registers every vitpipe variant so that ``timm.create_model(name)`` and
:func:`model.factory.create_model` build them. Nothing here imports torch.distributed, DeepSpeed,
accelerate or MLflow: distributed wrapping happens in :mod:`pipeline`.
"""

from model import structvit as structvit  # noqa: F401  (registration side effect; issue 3)
from model import vit_tiny  # noqa: F401  (registration side effect)
from model import zoo as zoo  # noqa: F401  (registers FilterViT, DropoutViT, Swin and DeiT baselines; issue 4)
from model.registry import is_model, list_models, register_model

__all__ = ["create_model", "is_model", "list_models", "register_model"]


def create_model(name: str, **kwargs):  # noqa: ANN201 - thin re-export, see model.factory.create_model
    """Builds a registered model; see :func:`model.factory.create_model`."""
    from model.factory import create_model as _create_model

    return _create_model(name, **kwargs)
