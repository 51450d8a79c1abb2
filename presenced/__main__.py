"""`python -m presenced` runs the same command line as the `presenced` script."""

from presenced.cli import main

if __name__ == "__main__":
    main(prog_name="presenced")
