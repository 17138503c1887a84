"""The `ofa-ufo` command line: one entry point whose subcommands front the library (see `main`)."""
