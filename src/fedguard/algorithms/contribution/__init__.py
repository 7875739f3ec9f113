"""Contribution scores: how much each client's update was worth to the round's model.

One cooperative game per round (``utility``): the players are the round's participants and
``v(S)`` is the utility of the model the server would have built from the updates of ``S`` alone,
with the configured aggregation rule and server optimizer (Song, Tong and Wei 2019: sub-models
reconstructed from the updates, never retrained). The scores, each citing its paper:

* ``shapley``: exact Shapley values by enumerating all ``2^K`` coalitions (``K <= 12``);
* ``gtg``: GTG-Shapley (Liu et al., ACM TIST 2022), Monte-Carlo estimates with guided sampling,
  between- and within-round truncation and a convergence test;
* ``leave_one_out``: ``v(N) - v(N without i)``, ``K + 1`` evaluations;
* ``cosine``: the cosine of each update to the aggregate (Xu et al., NeurIPS 2021), no evaluation.

Over rounds: ``ledger`` sums each client's scores (with a JSON form for checkpoints), ``rewards``
divides a reward by cumulative score with a floor share for every participant, and
``free_riders`` flags clients whose score stays below a threshold, or whose update stays
suspect (a norm far below the round's median, optionally a low cosine with the others' mean),
for several scored rounds.

Every utility-based score reports its cost (distinct coalitions evaluated, seconds); every
Monte-Carlo one takes its ``torch.Generator`` as an argument.
"""
