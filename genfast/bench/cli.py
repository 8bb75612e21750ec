def add_arguments(parser):
    parser.add_argument("ops", nargs="*")
    parser.add_argument("--quick", action="store_true")


def run(args):
    raise SystemExit("bench: not yet implemented")
