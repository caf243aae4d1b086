"""Several processes (``workers``) and several instances (``peers``) acting as one proxy."""
