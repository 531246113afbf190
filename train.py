"""Entry point: ``python train.py recipe=NAME [overrides]``, the same as ``kvlab train ...`` (kvlab.cli).

Hydra composes ``configs/train.yaml`` with the chosen recipe and overrides
(``python train.py --cfg job`` prints the result; ``-m`` sweeps), then
``kvlab.recipes.run`` does the work (``kvlab.recipes.uptrain`` for the
staged uptraining recipes). Configuration mistakes end the run
before training with one line naming the field and exit status 1.
"""

import sys

from kvlab.cli import train

if __name__ == "__main__":
    train(sys.argv[1:])
