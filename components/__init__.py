"""KFP v2 components: thin adapters over habla functions."""
