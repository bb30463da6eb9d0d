"""Serve a bound function: online over HTTP (``app.create_app``), in batch with Ray Data (``batch.run_batch``),
from images built from its reference (``image``), deployed here or to a cluster (``deploy``).

Nothing is imported here: the batch image has Ray but no FastAPI, the server image FastAPI but no Ray.
"""
