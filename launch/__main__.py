"""``python -m launch local|node ...``: see launch/local.py.

``local`` runs torchrun on this machine with the options given. ``node`` runs one node of a
multi-node job and also reads options it was not given from the environment (the PET_
variables that torchrun and the Kubeflow training operator use).
"""

import logging
import sys

from launch.local import main

if __name__ == "__main__":
    if sys.argv[1:2] not in (["local"], ["node"]):
        sys.exit("usage: python -m launch local|node [--nproc-per-node N] [--nnodes N --rdzv-endpoint HOST:PORT] -- TRAINER_ARGS")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(main(sys.argv[2:], mode=sys.argv[1]))
