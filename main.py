"""`python main.py --config configs/X.py[:variant] --workdir DIR [--config.key=value ...]`: onepfrac_jax.main."""

import os
import signal
import sys


def _interrupted_while_starting(signum, frame):
    """Ctrl-C during the imports and the flag parsing, before main() takes SIGINT over: nothing is written yet."""
    sys.stderr.write("error: interrupted (Ctrl-C) while starting; nothing was written\n")
    sys.stderr.flush()
    os._exit(130)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, _interrupted_while_starting)  # importing JAX takes a second or two

    from onepfrac_jax.main import cli

    cli()
