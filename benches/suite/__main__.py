"""`python -m suite` (from benches/) runs the suite as `python benches/run.py` does."""

from .cli import main

main()
