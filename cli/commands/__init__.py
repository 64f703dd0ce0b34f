"""Client command groups; each module registers its own with `register(app)`."""
