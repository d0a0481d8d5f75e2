"""The training loop's parts: config, data loader, schedules, engines, checkpoints, monitoring.

``pipeline.train`` is the façade (``run_train``); these modules are its pieces, small enough
to read one at a time. Like the rest of ``pipeline`` they never import ``registry`` or
``appliance``: the job reports what it produced and the service records it.
"""
