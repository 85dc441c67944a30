"""Hydra configs of the trp recipes (packaged: ``initialize_config_module("trp.configs")``).

Importing the package registers the schema the YAML files extend (``trp.recipes.schema``), so
``@hydra.main(config_path="pkg://trp.configs")`` finds it whatever the entry point imports.
"""

import trp.recipes.schema  # noqa: F401  (registers the structured configs in ConfigStore)
