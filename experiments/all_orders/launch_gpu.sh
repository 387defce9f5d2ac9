#!/usr/bin/env bash
# The order study at GPU size, end to end: every order of D, P, Q, E on ResNet-34 / CIFAR-10
# (chaincomp sweep, a grid study resumable with the same command), then the tables and plots of
# the pairwise, precedence, insertion and all-orders studies (chaincomp report).
#
#   experiments/all_orders/launch_gpu.sh [override ...]
#
# Extra arguments are chaincomp overrides for both commands (a reduced-size CPU proof:
#   experiments/all_orders/launch_gpu.sh trainer=cpu search.n_workers=1 data.max_train_samples=500 ...).
exec "$(dirname "$0")/../launch.sh" sweep orders_cifar10 "$@"
