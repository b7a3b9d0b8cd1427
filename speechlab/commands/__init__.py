"""One module per ``speechlab`` tool command: ``add_parser(subparsers)`` and the function it runs.

The argparse definition and the orchestration (read inputs, call the libraries, write outputs, print a summary)
live here and nothing else does; :mod:`speechlab.cli` imports only the module of the command it runs.
"""
