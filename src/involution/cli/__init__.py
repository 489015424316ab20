"""The ``involution`` command line: one module per subcommand, wired by ``__main__``."""
