"""dmlcore: train models on data partitioned across a Dask cluster."""
__version__ = "0.1.0"
