"""Training: NeMo configs (YAML + dotted overrides), manifests and audio made ready for NeMo, the distributed
topology read from the launcher's environment, Lightning plugins, and ``habla train`` itself."""
