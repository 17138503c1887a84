"""Command line: `python -m ofa_ufo presets` prints the preset table (parameter counts computed)."""

import argparse

from ofa_ufo.hf.presets import preset_table


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m ofa_ufo", description=__doc__)
    parser.add_argument("command", choices=["presets"])
    parser.parse_args()
    print(preset_table())


if __name__ == "__main__":
    main()
