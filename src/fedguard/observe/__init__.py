"""Watching runs: the live status file a run writes, the dashboard that follows run folders,
the self-contained HTML report of a run, and the tracking sinks (TensorBoard, MLflow).

Everything here reads or writes run folders and never touches the model, the clients' data or
their updates: what a run shows is what its folder holds (metrics.jsonl, summary.json,
status.json, partition.json, contributions.json, audit/), so a page can follow a simulated and a
deployed run alike, and can be served to someone who may only watch.
"""
