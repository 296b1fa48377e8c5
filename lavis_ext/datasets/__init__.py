"""Datasets: the webdataset pipeline, the `wds_caption` / `wds_vqa` builders, the synthetic world.

Importing this package registers the two builders with LAVIS and nothing else; the synthetic generator
and the pipeline are imported only where used.
"""
from lavis_ext.datasets import builders  # noqa: F401  (registers wds_caption, wds_vqa)
