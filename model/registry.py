"""vitpipe's models register into timm's registry, so ``timm.create_model(name)`` builds every one.

``register_model`` is timm's decorator (it fails loudly on duplicates of a name);
``list_models`` filters timm's registry. Importing :mod:`model` registers all vitpipe variants.
"""

from __future__ import annotations

from timm.models import is_model, list_models, register_model

__all__ = ["is_model", "list_models", "register_model"]
