"""One module per ``elmtrain`` subcommand, each with ``register(subparsers)`` (its options) and
the ``run(args)`` it sets; heavy imports go inside ``run`` (see ``elmtrain.cli``)."""
