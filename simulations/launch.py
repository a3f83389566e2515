"""The launcher moved into the product: ``python -m privtune_flwr.launch`` (``make run``, ``privtune-run``).

This name is kept so that the commands recorded in docs/results.md still run.
"""

from privtune_flwr.launch import main

if __name__ == "__main__":
    raise SystemExit(main())
