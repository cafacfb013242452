"""The machine's load average, printed beside every benchmark's table: figures taken on a busy machine are slower."""

import os


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, e.g. '0.52 0.61 0.70'."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
