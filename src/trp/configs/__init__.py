"""Hydra configs of the trp recipes (packaged: ``initialize_config_module("trp.configs")``)."""
