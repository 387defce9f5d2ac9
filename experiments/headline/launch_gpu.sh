#!/usr/bin/env bash
# The headline study end to end: D -> P -> Q -> E on ResNet-34 / CIFAR-10 (chaincomp run), then
# its tables and plots from MLflow (chaincomp report) into experiments/headline/results/cifar10/.
#
#   experiments/headline/launch_gpu.sh [override ...]
#
# Needs CUDA (conf/trainer/gpu.yaml). CIFAR-10 is found through data.path or $CHAINCOMP_DATA_DIR
# (the official python batches, or an ImageFolder archive such as cifar10-jpeg75.tar.gz).
# Extra arguments are chaincomp overrides for both commands, e.g. the reduced-size CPU proof:
#   experiments/headline/launch_gpu.sh trainer=cpu trainer.precision=bf16-mixed \
#       data.max_train_samples=1000 trainer.max_epochs=1 ...
exec "$(dirname "$0")/../launch.sh" run headline_cifar10 "$@"
