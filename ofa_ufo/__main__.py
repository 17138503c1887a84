"""`python -m ofa_ufo COMMAND ...`: the same command line as the `ofa-ufo` console script."""

from ofa_ufo.cli.main import run

if __name__ == "__main__":
    run()
