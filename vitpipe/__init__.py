"""vitpipe's command line: ``vitpipe demo|prep|train|eval|config|models|ui``.

The code lives in three packages: :mod:`model` (the model zoo, registered with timm),
:mod:`data_prep` (offline sharding) and :mod:`pipeline` (the training runtime).
"""
