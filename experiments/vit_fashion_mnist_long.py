r"""ViT on FashionMNIST: the strong recipe, longer, with random erasing, chosen on a valid split.

Command:   nice -n 19 hw2jax vit train --config experiments/vit_fashion_mnist_long.py \
             --workdir runs/vit_long --data-dir ../shared/data/fashion-mnist
Expected:  92.43 % test accuracy after 60 epochs (92.32 % valid), the same
           499,722-parameter model (experiments/results/vit_fashion_mnist_long/).

The 20- and 30-epoch strong runs end with train loss equal to test loss, so the model was still
fitting when the schedule ended: this recipe trains three times longer and adds random erasing
(p = 0.25), the regulariser that pays over long schedules on FashionMNIST in Zhong et al. (2017).
5,000 training images are held out as the validation split that picks the best epoch; test is
read once, at the end.
"""

import ml_collections
import vit_fashion_mnist_strong


def get_config() -> ml_collections.ConfigDict:
    c = vit_fashion_mnist_strong.get_config()  # differs from the strong recipe only here
    c.epochs = 60
    c.augment_erase = 0.25
    c.valid_size = 5000
    c.eval_split = "valid"
    c.best_metric = "valid_accuracy"
    return c
