"""Thin Prefect tasks joining the clips4 library and the artifact store, one module per stage; the stage graph
is :mod:`clips4.tasks.stages`."""
