"""Finetune stage for the small PTB model (goes with configs/ptb_small.py): averaged SGD
from the best training weights, lr 5 (the training run's), at most 2 short epochs (as
ptb_small's). It runs on the corpus of the run it starts from (that run's config.json),
so no --config.data.dir is needed.

The paper's finetune lr 25 undoes this early model: from the lr-5 run of seed 28 (valid
ppl 734.3) it gave 1041.2 and 985.3 and kept its starting weights; lr 5 gave 669.2 and
616.7, and 675.9, 627.3 and 677.9, 633.0 from the runs of seeds 1 and 2 (machine A;
configs/ptb_small.py has the probe).

    mos-jax finetune --config configs/ptb_small_finetune.py --workdir runs/ptb_small-ft \
        --config.finetune.init_from runs/ptb_small
"""

from pathlib import Path

from mos_jax.config import load_config_file


def get_config():
    c = load_config_file(Path(__file__).with_name("ptb_small.py"))
    c.finetune.init_from = "runs/ptb_small"
    c.finetune.lr = 5.0
    c.finetune.max_epochs = 2
    return c
