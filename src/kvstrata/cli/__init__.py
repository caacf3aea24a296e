"""The ``kvstrata`` command line: one module per subcommand group."""
