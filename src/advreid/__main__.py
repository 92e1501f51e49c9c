"""``python -m advreid`` (used by ``torchrun -m advreid train ...``)."""

from advreid.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
