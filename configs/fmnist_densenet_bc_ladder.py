"""The shipped Fashion-MNIST DenseNet-BC ladder: one recipe, four depths.

    dnl-zoo train --config configs/fmnist_densenet_bc_ladder.py \
        --workdir runs/ladder/densenet_bc40_k12_fmnist \
        --config.model.name=densenet_bc40_k12_fmnist

densenet_bc{16,22,28,40}_k12_fmnist: DenseNet-BC, k = 12, CIFAR stem, 28x28
greyscale. The DNL ladder's recipe (configs/fmnist_dnl_ladder.py: batch 128,
SGD with Nesterov momentum 0.9, weight decay 1e-4, learning rate 0.1 with a
0.3-epoch warm-up and cosine decay, crop and flip) over 12 epochs instead of
6. The dense blocks run the `shared` implementation (BatchNorm statistics once
per source: the same gradients as `plain`, faster).
scripts/train_ladder.sh trains and exports every rung; checkpoints/manifest.json
records what each took.
"""

import pathlib

from dnl_zoo import config as config_lib


def get_config():
    config = config_lib.load(pathlib.Path(__file__).with_name("fmnist_dnl_ladder.py"))
    config.model.name = "densenet_bc40_k12_fmnist"
    config.num_epochs = 12.0
    config.model.overrides = config_lib.ConfigDict(dict(implementation="shared"))
    return config
