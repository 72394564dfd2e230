"""The `sfddm` command line (cli.py), a thin layer over sfddm_core.stages."""
