"""``python -m simulations.screening NAME [ARGS...]``: run one named screen (``--list`` names them)."""
import importlib
import sys

# name -> (module, what it measures)
SCREENS = {
    "cache": ("cache", "cache the bottom's outputs after block SPLIT (every other screen reads them)"),
    "basis": ("basis", "a rank-k projection's leak, by who picks its basis (label, random, pca, inverter, lda-pca)"),
    "device-agreement": ("device_agreement", "label maps fitted per device against one map on all the data"),
    "federated-map": ("federated_map", "the federation's fit phase in one process, then utility and inversion"),
    "top-recipe": ("top_recipe", "what the cloud's top trains, for `none` at convergence"),
    "top-utility": ("top_utility", "headline points under another top recipe (KNN attack only)"),
}


def main(argv) -> int:
    if not argv or argv[0] in ("-h", "--help", "--list"):
        print(__doc__.strip())
        for name, (_, what) in SCREENS.items():
            print(f"  {name:<17} {what}")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SCREENS:
        print(f"error: screen {name!r} is unknown; accepted: {', '.join(SCREENS)}", file=sys.stderr)
        return 2
    importlib.import_module(f"simulations.screening.{SCREENS[name][0]}").main(rest)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
