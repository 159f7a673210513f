"""The keyfailover benchmark suite: `python benches/run.py [--smoke] [--no-litellm]`.

The suite itself is the `suite` package beside this file (see its docstring
and benches/README.md). The child processes it starts run this script too:
`python run.py ROLE JSON`.
"""

from suite.cli import main

if __name__ == "__main__":
    main()
