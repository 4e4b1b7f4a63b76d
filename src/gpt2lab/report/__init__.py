"""Reading runs: the curves of one or several runs (``plot.py``) and the table that compares them (``compare.py``)."""
