"""The subcommands other than the server and ``bench``: ``fastsocks hash-password``,
``example-config`` and ``check-config`` (config_files.py), ``explain``. Each module's
``main(argv)`` is what cli.SUBCOMMANDS runs."""
