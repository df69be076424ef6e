"""One module per ``elmtrain`` subcommand, each with ``register(subparsers)``."""
