"""A user-written training loop: SGD with gradient accumulation over ``k`` micro-batches.

A client whose memory holds ``client.batch_size`` examples at a time still takes the steps of
``k`` times that batch: it adds up the gradients of ``k`` micro-batches (each loss weighted by its
share of the step's examples) and steps once. The steps are those of plain SGD with batch
``k * client.batch_size`` over the same shuffle, up to float rounding. It reads ``lr``,
``momentum``, ``weight_decay``, ``epochs``, ``batch_size`` and ``max_steps`` from its task's
config (``[client]``), and applies no FedProx term, SCAFFOLD correction or DP-SGD: its
``features`` are empty, so fedguard refuses it with those before round 1.

Configured as::

    [client]
    batch_size = 8
    trainer = "examples.custom_plugins.accumulate:AccumulatingTrainer"
    trainer_options = { micro_batches = 4 }
"""

from __future__ import annotations

import torch

import fedguard


class AccumulatingTrainer(fedguard.ClientTrainer):
    """One SGD step per ``micro_batches`` micro-batches of ``batch_size`` examples."""

    def __init__(self, micro_batches: int = 4) -> None:
        if isinstance(micro_batches, bool) or not isinstance(micro_batches, int):
            raise ValueError(f"micro_batches must be an integer, got {micro_batches!r}.")
        if micro_batches < 1:
            raise ValueError(f"micro_batches must be at least 1, got {micro_batches}.")
        self.micro_batches = micro_batches

    def train(
        self, model: fedguard.ModelAdapter, data: fedguard.ClientData, task: fedguard.TrainTask
    ) -> fedguard.TrainResult:
        config = task.config
        # typed reads that name the entry in their error when it is missing or of the wrong type
        number, count = fedguard.config_float, fedguard.config_int
        micro = count(config, "batch_size")
        max_steps = None if config.get("max_steps") is None else count(config, "max_steps")
        params = [s.param for s in model.trainable()]
        optimizer = torch.optim.SGD(
            params,
            lr=number(config, "lr"),
            momentum=number(config, "momentum", 0.0),
            weight_decay=number(config, "weight_decay", 0.0),
            foreach=True,
        )
        x, y = data.train_x, data.train_y
        n = int(y.shape[0])
        model.train_mode(True)
        losses: list[float] = []
        for _ in range(count(config, "epochs", 1)):
            order = torch.randperm(n, generator=task.generator)
            for step in torch.split(order, micro * self.micro_batches):
                optimizer.zero_grad(set_to_none=True)
                loss_of_step = 0.0
                for part in torch.split(step, micro):
                    share = len(part) / len(step)
                    log_probs = model.log_probabilities(x[part], training=True)
                    loss = torch.nn.functional.nll_loss(log_probs, y[part])
                    (loss * share).backward()
                    loss_of_step += float(loss.detach()) * share
                optimizer.step()
                losses.append(loss_of_step)
                if max_steps is not None and len(losses) >= max_steps:
                    break
            if max_steps is not None and len(losses) >= max_steps:
                break
        update = model.get_flat() - task.params
        metrics = {"train_loss": sum(losses) / max(len(losses), 1), "steps": float(len(losses))}
        return fedguard.TrainResult(update, n, metrics)
