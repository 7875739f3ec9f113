"""Privacy audits of a finished run (``fedguard audit RUN_DIR``): attack it as an adversary
would and put what the attacker gets beside the privacy the run claims.

:mod:`.runner` runs the attacks and writes ``audit/``; :mod:`.canary_audit` and :mod:`.one_run`
give the empirical epsilon lower bound of the run's canaries (:mod:`.canary`, inserted by
``fedguard run --audit-canaries M``); :mod:`.membership` infers membership from the final
model; :mod:`.inversion` reconstructs a client's records from its update; :mod:`.target`
rebuilds the run from its folder.
"""
