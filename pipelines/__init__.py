"""The built-in recipes: this folder's YAML files, installed as package data of
``medvol.pipelines`` (see ``medvol.config.builtin_recipes`` and ``medvol recipes``)."""
