"""The ``peft-safety`` command line: a thin dispatcher, one module per subcommand (see :mod:`peft_safety.cli.main`)."""
