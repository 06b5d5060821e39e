"""Shared building blocks of vitpipe's architectures; import from the submodules directly."""
