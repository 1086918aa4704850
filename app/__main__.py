"""`python -m app`: the production entry point (app.server).

python -m app --host 0.0.0.0 --port 8000
"""

from app.early_exit import exit_at_once_on_signals

exit_at_once_on_signals()  # before the seconds of importing torch (app.early_exit)

import sys  # noqa: E402

from app.arguments import parse_arguments  # noqa: E402

if __name__ == "__main__":
    arguments = parse_arguments()  # a usage error exits here, before the imports below
    from app.server import main

    sys.exit(main(arguments))
