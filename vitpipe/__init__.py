"""vitpipe's command line: ``vitpipe demo|prep|train|eval|export|config|models|viz|ui|submit|status|cancel``.

Argument parsing and subcommands only: :mod:`vitpipe.cli` (the entry point), :mod:`vitpipe.commands`,
:mod:`vitpipe.prep`, :mod:`vitpipe.demo`, :mod:`vitpipe.viz`, :mod:`vitpipe.ui` and the ``slurm*`` modules;
user errors in :mod:`vitpipe.errors`, the local torchrun launcher in :mod:`vitpipe.launch`. The work is done
by :mod:`model` (the model zoo, registered with timm), :mod:`data_prep` (offline sharding) and
:mod:`pipeline` (the training runtime). Building the parser imports no torch.
"""
