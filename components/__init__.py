"""KFP v2 components: thin adapters over habla's functions (installed as ``habla.components``).

Every component is a lightweight Python component whose body imports habla; the images in ``infra/``
carry habla and kfp, so nothing is pip-installed when a step runs (``install_kfp_package=False``).
``base_image`` is only a default: the pipelines set each step's image when they are compiled
(habla.kubeflow.compile.CompileOptions).
"""
